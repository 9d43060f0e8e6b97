"""What ``--load_checkpoint`` can point at, as one map ``{mftune name: Entry}``.

An ``Entry`` knows a tensor's global shape and reads any block of it, so the loader (``io.py``)
reads only the block each rank holds, whatever the source:

- a complete mftune ``.safetensors`` file;
- a directory of complete files, loaded together (e.g. a base and a LoRA checkpoint, as
  MindFormers loads every file of a directory); a name in two files is an error;
- a Hugging Face directory (``config.json`` + ``model.safetensors`` / sharded safetensors with
  their index / ``pytorch_model*.bin``): names translated on the fly, nothing written;
- a PEFT LoRA adapter directory (``adapter_config.json``): its adapters, renamed, plus any
  complete ``.safetensors`` file placed beside them (the base);
- a distributed checkpoint directory (``rank_{r}/``, as the trainer saves it): each rank's file is
  the one its ``meta.json`` names (else its newest); a block is assembled from the pieces of the
  rank files that overlap it, using the global shape and block each file records in its header.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open

Block = tuple[slice, ...]
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file, the tensor and the fix."""


@dataclass
class Entry:
    shape: tuple[int, ...]
    read: Callable[[Block], torch.Tensor]  # the block of the global tensor, on the CPU
    origin: str  # the file it comes from, for messages

    def full(self) -> torch.Tensor:
        return self.read(tuple(slice(0, n) for n in self.shape))

    @property
    def dtype(self) -> torch.dtype:
        """From a one-element read (sources record shapes only)."""
        return self.read(tuple(slice(0, min(n, 1)) for n in self.shape)).dtype


def open_checkpoint(path: str) -> dict[str, Entry]:
    """Every tensor ``path`` provides, by mftune name (see the module docstring)."""
    if os.path.isfile(path):
        return safetensors_entries(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"load_checkpoint={path} does not exist. Give a checkpoint file or directory.")
    if os.path.exists(os.path.join(path, "adapter_config.json")):  # + complete files beside it (a base)
        from mftune.checkpoint.peft import read_peft_adapter
        tensors, _ = read_peft_adapter(path)
        entries = {n: Entry(tuple(t.shape), lambda block, t=t: t[block], path) for n, t in tensors.items()}
        others = [f for f in glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
                  if os.path.basename(f) != "adapter_model.safetensors"]
        return _merge(path, [entries] + [safetensors_entries(f) for f in sorted(others)])
    if os.path.exists(os.path.join(path, "config.json")) and any(
            os.path.exists(os.path.join(path, f)) for f in HF_WEIGHTS):
        return _hf_entries(path)
    if glob.glob(os.path.join(glob.escape(path), "rank_*")):
        return distributed_entries(path)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"load_checkpoint={path} is a directory with no checkpoint mftune recognises: expected "
            f".safetensors files, a Hugging Face model (config.json + weights), a PEFT adapter "
            f"(adapter_config.json) or rank_*/ folders of a distributed checkpoint.")
    return _merge(path, [safetensors_entries(f) for f in files])


def _merge(path: str, parts: list[dict[str, Entry]]) -> dict[str, Entry]:
    """The union of several files' tensors; a name in two of them is an error naming both."""
    entries: dict[str, Entry] = {}
    for part in parts:
        for name, entry in part.items():
            if name in entries:
                raise CheckpointError(
                    f"load_checkpoint={path}: tensor {name} is in both {entries[name].origin} and "
                    f"{entry.origin}. Keep one of them in the directory.")
            entries[name] = entry
    return entries


def safetensors_entries(path: str, rename: Callable[[str], str | None] = lambda n: n) -> dict[str, Entry]:
    """The tensors of one safetensors file (renamed; ``rename`` returning None skips a tensor)."""
    with open_safetensors(path) as f:
        if "mftune_shards" in (f.metadata() or {}):
            raise CheckpointError(
                f"checkpoint {path} holds one rank's shards of a distributed checkpoint; pass the "
                f"directory that holds its rank_*/ folders to load the whole checkpoint.")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    entries = {}
    for key, shape in shapes.items():
        name = rename(key)
        if name is not None:
            entries[name] = Entry(shape, lambda block, key=key: _read(path, key, block), path)
    return entries


def _read(path: str, key: str, block: Block) -> torch.Tensor:
    # Re-opened per tensor: the memory map, and the pages the read touched, are released after it.
    with safe_open(path, framework="pt") as f:
        return f.get_slice(key)[block]


def open_safetensors(path: str):
    """``safe_open`` with mftune's errors: a missing, foreign or truncated file is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist. Check load_checkpoint.")
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error types for foreign/truncated files
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({exc}). mftune reads "
            f".safetensors files (checkpoints, Hugging Face weights).") from None


def _hf_entries(hf_dir: str) -> dict[str, Entry]:
    """A Hugging Face Llama directory, renamed to mftune names (rotary buffers skipped)."""
    from mftune.checkpoint.names import hf_to_mftune, is_hf_buffer

    unknown: list[str] = []

    def rename(hf_name: str) -> str | None:
        if is_hf_buffer(hf_name):
            return None
        try:
            return hf_to_mftune(hf_name)
        except KeyError:
            unknown.append(hf_name)
            return None

    entries: dict[str, Entry] = {}
    for file in _hf_weight_files(hf_dir):
        if file.endswith(".safetensors"):
            entries.update(safetensors_entries(file, rename))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for hf_name, t in state.items():
                name = rename(hf_name)
                if name is not None:
                    entries[name] = Entry(tuple(t.shape), lambda block, t=t: t[block], file)
    if unknown:
        raise CheckpointError(f"Hugging Face checkpoint {hf_dir} has tensors that are not Llama weights: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Use a "
                              f"LlamaForCausalLM checkpoint.")
    return entries


def _hf_weight_files(hf_dir: str) -> list[str]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.exists(os.path.join(hf_dir, index)):
            with open(os.path.join(hf_dir, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
            if missing:
                raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: {index} lists {missing[0]}, which "
                                      f"is missing. Copy the whole model directory.")
            return [os.path.join(hf_dir, f) for f in files]
        if os.path.exists(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise CheckpointError(f"Hugging Face checkpoint {hf_dir} has no weights ({', '.join(HF_WEIGHTS)}).")


def rank_file(rank_dir: str) -> str:
    """The file of one rank: the one its meta.json names (the last complete save), else the newest."""
    meta = os.path.join(rank_dir, "meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            info = json.load(f)
        file = os.path.join(rank_dir, info.get("last_ckpt_file") or "")
        if os.path.isfile(file):
            size = info.get("file_size")
            if size is not None and os.path.getsize(file) != size:
                raise CheckpointError(f"checkpoint {file} has {os.path.getsize(file)} bytes but {meta} "
                                      f"recorded {size}: it was truncated or replaced. Restore it or "
                                      f"remove the folder's meta.json to use the newest file.")
            return file
    files = glob.glob(os.path.join(glob.escape(rank_dir), "*.safetensors"))
    if not files:
        raise CheckpointError(f"distributed checkpoint folder {rank_dir} holds no .safetensors file.")
    return max(files, key=os.path.getmtime)


def rank_dirs(root: str) -> list[str]:
    """``root/rank_0``, ``rank_1``, ... in rank order."""
    found = glob.glob(os.path.join(glob.escape(root), "rank_*"))
    return sorted((d for d in found if os.path.basename(d)[5:].isdigit()),
                  key=lambda d: int(os.path.basename(d)[5:]))


def distributed_entries(root: str, files: list[str] | None = None) -> dict[str, Entry]:
    """Tensors of a rank_{r}/ checkpoint (``files``: one per rank; default: each rank's last
    complete file), each assembled from the rank files' pieces."""
    pieces: dict[str, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files or [rank_file(d) for d in rank_dirs(root)]:
        with open_safetensors(file) as f:
            meta = f.metadata() or {}
            held = json.loads(meta["mftune_shards"])["tensors"] if "mftune_shards" in meta else {}
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                info = held.get(key, {"global_shape": shape, "block": [[0, n] for n in shape]})
                block = tuple(tuple(b) for b in info["block"])
                shapes[key] = tuple(info["global_shape"])
                if (file, block) not in pieces.setdefault(key, []) and not any(
                        b == block for _, b in pieces[key]):  # replicas: read one copy
                    pieces[key].append((file, block))
    return {name: Entry(shapes[name], lambda block, name=name: _assemble(name, block, pieces[name]),
                        root) for name in pieces}


def _assemble(name: str, block: Block, pieces: list) -> torch.Tensor:
    out, filled = None, 0
    want = [(s.start or 0, s.stop) for s in block]
    for file, held in pieces:
        inter = [(max(lo, plo), min(hi, phi)) for (lo, hi), (plo, phi) in zip(want, held)]
        if any(lo >= hi for lo, hi in inter):
            continue
        src = _read(file, name, tuple(slice(lo - plo, hi - plo) for (lo, hi), (plo, _) in zip(inter, held)))
        if out is None:
            out = torch.empty([hi - lo for lo, hi in want], dtype=src.dtype)
        out[tuple(slice(lo - wlo, hi - wlo) for (lo, hi), (wlo, _) in zip(inter, want))] = src
        filled += src.numel()
    numel = 1
    for lo, hi in want:
        numel *= hi - lo
    if filled != numel:
        raise CheckpointError(f"distributed checkpoint: the rank files hold {filled} of the {numel} values "
                              f"of {name} this rank needs; a rank_*/ folder is missing or incomplete.")
    if out is None:  # an empty block (e.g. the last rank's piece of a short tensor): right dtype, no bytes
        dtype = _read(pieces[0][0], name, tuple(slice(0, 0) for _ in pieces[0][1])).dtype
        out = torch.empty([hi - lo for lo, hi in want], dtype=dtype)
    return out
