"""What attention may see: the decoding KV cache, padding masks, pad-token keys and packed samples.

Used by ``mftune.models.llama`` (the attention layer takes a boolean SDPA mask or a ``PackedSamples``)
and by ``mftune.generation`` (``KVCache``).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class KVCache:
    """Keys and values of past positions for incremental decoding (MindFormers ``use_past``).

    One ``(bs, n_kv_heads, max_len, head_dim)`` buffer per layer for keys and one for values, allocated
    on a layer's first ``update`` with the shape, dtype and device of its keys (so local heads under a
    tensor-parallel plan, bf16 under autocast). Slots are shared by the batch: slot ``t`` of every row
    holds the ``t``-th token fed to the model, padding included; which slots a row may attend to is the
    caller's ``attention_mask``. ``length`` counts the slots filled by earlier forwards; the model
    advances it after each forward. A prefix method's keys/values take no slots: the model keeps them in
    ``prefix`` and puts them before the slots at every step.
    """

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.prefix: Tensor | None = None  # a prefix method's keys/values, computed once per decode
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers

    def update(self, layer_id: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` (bs, n_kv_heads, seqlen, head_dim) at slots ``length..``; return every filled slot."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {start} are filled and {k.shape[2]} more "
                             "were fed. Build the cache with a larger max_len.")
        if self.k[layer_id] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer_id] = k.new_empty(shape)
            self.v[layer_id] = v.new_empty(shape[:3] + (v.shape[3],))
        ck, cv = self.k[layer_id], self.v[layer_id]
        ck[:, :, start:end], cv[:, :, start:end] = k, v
        return ck[:, :, :end], cv[:, :, :end]  # (bs, n_kv_heads, end, head_dim)


def attention_mask_4d(seqlen: int, past: int, key_padding: Tensor | None, device: torch.device) -> Tensor:
    """Boolean SDPA mask ``(bs | 1, 1, seqlen, past + seqlen)``; True = may attend.

    Query ``i`` sits in slot ``past + i`` and sees slots ``<= past + i`` (causal) whose ``key_padding``
    ``(bs, past + seqlen)`` entry is nonzero. A query always sees its own slot, so a padding query
    (whose output nobody reads) never has an all-masked row, which SDPA would turn into NaN.
    """
    q_slot = torch.arange(past, past + seqlen, device=device)[:, None]  # (seqlen, 1)
    k_slot = torch.arange(past + seqlen, device=device)[None, :]  # (1, past + seqlen)
    mask = k_slot <= q_slot  # (seqlen, past + seqlen)
    if key_padding is not None:
        mask = (mask & key_padding.bool()[:, None, :]) | (k_slot == q_slot)  # (bs, seqlen, past + seqlen)
    return mask.unsqueeze(-3) if mask.dim() == 3 else mask[None, None]


def pad_keys_visible(tokens: Tensor, pad_id: int) -> bool:
    """Whether a token that is not ``pad_id`` follows a ``pad_id`` in some row of ``tokens`` (bs, seqlen).

    Only then can a query that is not padding see a padding key under causal attention, so only then
    does hiding padding keys (``hide_keys``) change the output at any position that is not padding: a
    right-padded batch keeps the fused causal kernel. Reading the answer is one device sync per
    forward (transformers' SDPA path makes the same check before it drops an all-ones mask).
    """
    is_pad = tokens == pad_id  # (bs, seqlen)
    seen_pad = is_pad.cumsum(dim=1) > 0  # (bs, seqlen): a pad at or before this position
    return bool((seen_pad[:, :-1] & ~is_pad[:, 1:]).any())


def hide_keys(mask: Tensor | None, keep: Tensor) -> Tensor:
    """Boolean SDPA mask ``(bs, 1, seqlen, seqlen)``: ``mask`` (causal when None; else ``(bs | 1, 1,
    seqlen, seqlen)``) with every key whose ``keep`` (bs, seqlen) entry is False hidden from every query,
    as MindFormers' mask from ``pad_token_id`` does (a pad query too sees only the real keys before it).
    A query left with no key at all (a row that starts with pads) sees itself instead, where SDPA would
    give NaN (MindFormers' additive mask spreads it over the whole row instead, later tokens included)."""
    seqlen = keep.shape[1]
    if mask is None:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=keep.device).tril()
    mask = mask & keep[:, None, None, :]  # (bs, 1, seqlen, seqlen)
    eye = torch.eye(seqlen, dtype=torch.bool, device=keep.device)  # (seqlen, seqlen)
    return mask | (eye & ~mask.any(dim=-1, keepdim=True))


def prefix_visible(mask: "Tensor | PackedSamples | None", num_prefix: int, seqlen: int,
                   device: torch.device) -> "Tensor | PackedSamples":
    """``mask`` (None: causal over ``seqlen`` keys; a boolean SDPA mask ``(bs | 1, 1, seqlen, keys)``; a
    ``PackedSamples`` holding one) with ``num_prefix`` keys put before the others, visible to every query: the
    keys/values of a prefix method (MindFormers' prefix columns of zeros in its additive mask)."""
    if isinstance(mask, PackedSamples):
        return PackedSamples(mask=prefix_visible(mask.mask, num_prefix, seqlen, device))
    if mask is None:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()[None, None]
    ones = torch.ones(*mask.shape[:-1], num_prefix, dtype=torch.bool, device=mask.device)
    return torch.cat([ones, mask], dim=-1)  # (bs | 1, 1, seqlen, num_prefix + keys)


@dataclass
class PackedSamples:
    """Where the samples of packed records start, for attention that stays inside each sample.

    Built once per forward by ``packed_samples`` from the records' position ids (a sample starts
    where its position id is 0) and shared by every layer. ``mask``: boolean SDPA mask
    ``(bs, 1, seqlen, seqlen)``, causal within a sample (any device). ``cu_seqlens``/``max_len``:
    the same samples over the flattened batch for ``torch.nn.attention.varlen.varlen_attn`` (flash
    attention without a mask; CUDA, half precision), set only when that kernel can run.
    """

    mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_len: int = 0


@functools.cache
def _varlen_attn() -> Callable | None:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) as ``f(q, k, v, cu_seqlens, max_len)``
    for causal attention over ``(tokens, heads, head_dim)`` inputs; None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def attend(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
        if k.shape[1] != q.shape[1] and not gqa:  # older signature: repeat the key/value heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        extra = {"enable_gqa": k.shape[1] != q.shape[1]} if gqa else {}
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **extra)

    return attend


def packed_samples(positions: Tensor, *, varlen: bool, device: torch.device | None = None) -> PackedSamples:
    """``PackedSamples`` of ``positions`` (bs, seqlen) for attention on ``device`` (default: where
    ``positions`` are): a new sample starts at
    every 0 and at each row start. ``cu_seqlens`` are found where ``positions`` live (CPU positions, as
    the trainer passes them, need no device sync for ``max_len``) and copied over; the mask is built on
    ``device``."""
    bs, seqlen = positions.shape
    device = positions.device if device is None else device
    if varlen:
        starts = positions.cpu() == 0
        starts[:, 0] = True
        flat = torch.nonzero(starts.flatten()).flatten().to(torch.int32)  # (num_samples,)
        cu = torch.cat([flat, flat.new_tensor([bs * seqlen])])
        return PackedSamples(cu_seqlens=cu.to(device, non_blocking=True), max_len=int((cu[1:] - cu[:-1]).max()))
    starts = positions.to(device) == 0
    starts[:, 0] = True
    sample = starts.cumsum(dim=1)  # (bs, seqlen) sample index within the row
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
    return PackedSamples(mask=((sample[:, :, None] == sample[:, None, :]) & causal).unsqueeze(1))
