"""Fused projections of MindFormers' ``qkv_concat: True`` checkpoints, split into mftune's separate ones.

With ``qkv_concat`` MindFormers computes wq/wk/wv as one matmul ``attention.w_qkv`` (rows: q, then k, then v)
and w1/w3 as ``feed_forward.w_gate_hidden`` (rows: w1, then w3); its convert_weight.py writes those by
concatenating the separate weights along the output dimension. mftune keeps them separate, whatever
``qkv_concat`` says, and reads a fused checkpoint by splitting the rows: each part is an Entry over a
row range of the fused one, so a rank still reads only its block. The q rows are the hidden size (the
fused weight's column count); k and v share the rest equally (grouped-query attention included).

A fused tensor assembled from a model-parallel run holds each rank's [q_r, k_r, v_r] in turn (the split
happens per rank there); such a checkpoint is only meaningful at its own model_parallel in MindFormers
too. The split here is the complete layout MindFormers' convert_weight.py writes.
"""
from __future__ import annotations

import re

from mftune.checkpoint.entries import Entry
from mftune.errors import CheckpointError

FUSED = re.compile(r"^(?P<prefix>(?:adam_[mv]\.)?model\.layers\.\d+\.)"
                   r"(?P<fused>attention\.w_qkv|feed_forward\.w_gate_hidden)\.weight$")
PARTS = {"attention.w_qkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w_gate_hidden": ("feed_forward.w1", "feed_forward.w3")}


def split_fused(entries: dict[str, Entry]) -> dict[str, Entry]:
    """``entries`` with every fused ``w_qkv`` / ``w_gate_hidden`` weight (and its AdamW moments)
    replaced by the separate weights it holds; anything else fused (a LoRA factor, a bias) is an error."""
    if not any("w_qkv" in name or "w_gate_hidden" in name for name in entries):
        return entries
    out = {name: entry for name, entry in entries.items() if not FUSED.match(name)}
    for name, entry in entries.items():
        m = FUSED.match(name)
        if m is None:
            if "w_qkv" in name or "w_gate_hidden" in name:
                raise CheckpointError(
                    f"checkpoint {entry.origin}: {name} belongs to a fused projection (qkv_concat) that mftune "
                    f"cannot split (only fused weights and their optimizer moments can be). Merge the adapter "
                    f"into the base first (MindFormers' transform_ckpt_lora.py), or train it with qkv_concat: False.")
            continue
        for part, (lo, hi) in zip(PARTS[m["fused"]], _row_ranges(m["fused"], entry, name)):
            split = f"{m['prefix']}{part}.weight"
            if split in out:
                raise CheckpointError(f"checkpoint {entry.origin} holds both {name} and {split}: keep the fused "
                                      f"or the separate weights, not both.")
            out[split] = rows(entry, lo, hi, f"{name}[{lo}:{hi}]")
    return out


def _row_ranges(fused: str, entry: Entry, name: str) -> list[tuple[int, int]]:
    rows_, cols = entry.shape if len(entry.shape) == 2 else (0, 0)
    if fused == "attention.w_qkv":
        kv, odd = divmod(rows_ - cols, 2)
        if len(entry.shape) != 2 or kv <= 0 or odd:
            raise CheckpointError(f"checkpoint {entry.origin}: {name} has shape {list(entry.shape)}; a fused "
                                  f"w_qkv is [hidden + 2 x kv, hidden].")
        return [(0, cols), (cols, cols + kv), (cols + kv, rows_)]
    if len(entry.shape) != 2 or rows_ % 2:
        raise CheckpointError(f"checkpoint {entry.origin}: {name} has shape {list(entry.shape)}; a fused "
                              f"w_gate_hidden is [2 x ffn_hidden, hidden].")
    return [(0, rows_ // 2), (rows_ // 2, rows_)]


def rows(entry: Entry, lo: int, hi: int, what: str) -> Entry:
    """An Entry over rows ``lo:hi`` of ``entry`` (reads only the block asked for, shifted)."""
    def shift(block):
        first = block[0]
        return (slice(lo + first.start, lo + first.stop), *block[1:])

    read_into = None if entry.read_into is None else (lambda block, out: entry.read_into(shift(block), out))
    return Entry((hi - lo, *entry.shape[1:]), lambda block: entry.read(shift(block)), f"{entry.origin} ({what})",
                 entry.known_dtype, read_into)
