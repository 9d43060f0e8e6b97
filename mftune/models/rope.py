"""Rotary position embedding, rotate-half layout (Hugging Face's and MindFormers'), so Hugging Face
weights need no q/k permutation."""
from __future__ import annotations

import torch
from torch import Tensor

from mftune.models.config import ModelArgs


def rope_cos_sin(args: ModelArgs, seq_len: int, device: torch.device,
                 positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RoPE tables for positions 0..seq_len-1, each ``(seq_len, head_dim)`` float32, HF layout cat(freqs, freqs).

    ``positions`` (any shape, e.g. ``(bs, seqlen)`` for left-padded rows) replaces ``arange(seq_len)``;
    the tables then have shape ``positions.shape + (head_dim,)`` and the same values position by position.

    "PI" divides positions by the scaling factor; "NTK" raises the base to
    ``theta * scaling_factor ** (head_dim / (head_dim - 2))`` (MindFormers' static NTK; HF's dynamic
    NTK reaches this base only at one sequence length). Always computed in float32, outside autocast.
    """
    dim, base = args.head_dim, args.theta
    if args.extend_method == "NTK":
        base = base * args.scaling_factor ** (dim / (dim - 2))
    with torch.autocast(device_type=device.type, enabled=False):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        pos = positions.to(device=device, dtype=torch.float32)  # (seqlen,) or (bs, seqlen)
        if args.extend_method == "PI":
            pos = pos / args.scaling_factor
        freqs = pos[..., None] * inv_freq  # (..., seqlen, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., seqlen, dim)
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
    """Rotate ``x`` (bs, seqlen, n_heads, head_dim) in ``dtype`` and return it in its own dtype.

    ``cos``/``sin`` are ``(seqlen, head_dim)`` (positions shared by the batch) or ``(bs, seqlen, head_dim)``.

    Autocast is off here: its ``cat`` promotion rejects a float16 tensor under bfloat16 autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        xr = x.to(dtype)
        cos, sin = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)  # ([bs,] seqlen, 1, head_dim)
        return (xr * cos + rotate_half(xr) * sin).to(x.dtype)
