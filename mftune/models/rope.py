"""Rotary position embedding, rotate-half layout (Hugging Face's and MindFormers'), so Hugging Face
weights need no q/k permutation."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mftune.models.config import ModelArgs


def inv_freq(args: ModelArgs, device: torch.device, seq_len: int | Tensor | None = None) -> Tensor:
    """The ``(head_dim/2,)`` float32 rotation frequencies ``1 / base ** (2i / head_dim)`` of ``args``' RoPE.

    "NTK" raises the base to ``theta * scaling_factor`` (MindFormers' static NTK, ``FreqsMgr`` r1.1-r1.5:
    ``theta *= scaling_factor``). "DYNAMIC_NTK" (transformers' ``rope_type: dynamic``) depends on
    ``seq_len``, the length of the call (None: the original length): see ``dynamic_ntk_inv_freq``.
    "LLAMA3" (Llama 3.1; MindFormers' ``FreqsMgr`` and transformers' ``rope_type: llama3``) keeps the
    frequencies whose wavelength ``2 pi / f`` is below ``original_max_position_embeddings / high_freq_factor``,
    divides those above ``original_max_position_embeddings / low_freq_factor`` by ``factor``, and interpolates
    between the two with ``s = (original_max_position_embeddings / wavelength - low_freq_factor) /
    (high_freq_factor - low_freq_factor)``: ``(1 - s) f / factor + s f``. Positions are not scaled.
    """
    dim, base = args.head_dim, args.theta
    if args.extend_method == "NTK":
        base = base * args.scaling_factor
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)
    if args.extend_method == "DYNAMIC_NTK" and seq_len is not None:
        return dynamic_ntk_inv_freq(args, seq_len, freqs)
    if args.extend_method != "LLAMA3":
        return freqs
    s = args.scaling_factor
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_context / low, freqs / factor, freqs)  # low band / high band
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, (1 - smooth) * freqs / factor + smooth * freqs, scaled)


def dynamic_ntk_inv_freq(args: ModelArgs, seq_len: int | Tensor, plain: Tensor) -> Tensor:
    """DYNAMIC_NTK's frequencies for a call over ``seq_len`` positions (``plain``: the unscaled ones).

    With ``L = max_position_embedding`` (the original context) and ``s = scaling_factor``, a call longer
    than ``L`` uses the base ``theta * (s * seq_len / L - (s - 1)) ** (d / (d - 2))`` (transformers'
    ``_compute_dynamic_ntk_parameters``, the same float32 arithmetic); up to ``L`` the plain frequencies.
    ``seq_len`` may be a 0-d tensor on the device (no host sync: both sets are computed and one is picked).

    transformers is *stateful* where this is per call: its rotary module keeps the frequencies of the
    longest call seen and returns to the plain ones only for a call shorter than ``L``. The two agree on
    any single forward and on cached generation (positions only grow); they differ for a call of length
    ``L <= seq_len < longest`` made after a longer one on the same transformers module, where mftune
    gives what a fresh transformers model gives.
    """
    original, factor, dim = args.max_position_embedding, args.scaling_factor, args.head_dim
    length = torch.as_tensor(seq_len, device=plain.device)  # () int64
    grown = torch.clamp(length, min=original)  # the base of the branch torch.where keeps is >= theta
    base = args.theta * ((factor * grown / original) - (factor - 1)) ** (dim / (dim - 2))  # () float32
    scaled = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=plain.device) / dim))
    return torch.where(length > original, scaled, plain)  # (dim/2,)


def rope_cos_sin(args: ModelArgs, seq_len: int, device: torch.device,
                 positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RoPE tables for positions 0..seq_len-1, each ``(seq_len, head_dim)`` float32, HF layout cat(freqs, freqs).

    ``positions`` (any shape, e.g. ``(bs, seqlen)`` for left-padded rows) replaces ``arange(seq_len)``;
    the tables then have shape ``positions.shape + (head_dim,)`` and the same values position by position.
    They must be the global positions (a decode step's are ``cache length ..``; a sequence-parallel rank's
    are the whole sequence's): DYNAMIC_NTK's frequencies depend on the call's length, ``max(positions) + 1``
    (``seq_len`` without ``positions``), as transformers' ``dynamic_rope_update`` takes it.

    Frequencies from ``inv_freq``; "PI" divides positions by the scaling factor. Always computed in
    float32, outside autocast.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        length = seq_len
        if args.extend_method == "DYNAMIC_NTK" and positions is not None and positions.numel():
            length = positions.max() + 1  # () on the positions' device
        freqs_base = inv_freq(args, device, length)  # (dim/2,)
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        pos = positions.to(device=device, dtype=torch.float32)  # (seqlen,) or (bs, seqlen)
        if args.extend_method == "PI":
            pos = pos / args.scaling_factor
        freqs = pos[..., None] * freqs_base  # (..., seqlen, dim/2)
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
