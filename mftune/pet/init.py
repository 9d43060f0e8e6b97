"""LoRA initialisations from PEFT's ``init_lora_weights``: gaussian, and PiSSA / OLoRA, which take the adapters from
the base weight.

PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) start A and B from the principal singular vectors (a QR
decomposition for OLoRA) of W, and PEFT then replaces W by the residual ``W - s B0 A0`` so that the model starts
as the base. mftune keeps W as it was loaded and holds ``A0``/``B0`` as frozen parameters
(``mindpet_delta_init_a`` / ``_b``) that the layer subtracts: ``W x + s (B A - B0 A0) x`` is PEFT's
``W_res x + s B A x``, so the base, its fingerprint, checkpoints and merges keep meaning the original weights.
``A0``/``B0`` are never saved: they are computed again from the base whenever it is loaded, in the weight's
dtype (``param_init_type``; the merge and export tools round the stored base to it first). ``pissa`` and
``olora`` then agree across devices up to float32 rounding of the product ``B0 A0`` (an SVD's signs cancel in
it); ``pissa_niter_N``'s randomised SVD runs on the CPU from a fixed seed, so its draws are the same everywhere.
"""
from __future__ import annotations

import torch

from mftune.models.config import DTYPES

INIT_A, INIT_B = "mindpet_delta_init_a", "mindpet_delta_init_b"  # frozen A0 [r, in], B0 [out, r]
NITER_SEED = 0  # pissa_niter_N: the randomised SVD's draws (the same on every rank and every load)


def gaussian_(lora_a: torch.Tensor, rank: int) -> torch.Tensor:
    """PEFT's ``gaussian``: A ~ N(0, 1/r) (std 1/r), in place."""
    return torch.nn.init.normal_(lora_a, std=1 / rank)


@torch.no_grad()
def initial_factors(weight: torch.Tensor, rank: int, scaling: float, method: str,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0 [r, in], B0 [out, r])`` in float32 from the whole ``weight`` [out, in], as PEFT's ``pissa_init`` /
    ``olora_init`` compute them; ``scaling * B0 @ A0`` is W's best rank-r part (PiSSA) or its first r QR columns'.
    ``dtype``: round the weight to it first (the dtype the training run held it in)."""
    w = (weight if dtype is None else weight.to(dtype)).float()
    if method == "olora":
        q, r = torch.linalg.qr(w)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    if method == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :rank], s[:rank] / scaling, uh[:rank]
    elif method.startswith("pissa_niter_"):  # on the CPU: its random draws then are the same wherever it runs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NITER_SEED)
            vr, sr, ur = torch.svd_lowrank(w.cpu(), rank, niter=int(method[len("pissa_niter_"):]))
        vr, sr, ur = (t.to(w.device) for t in (vr, sr, ur))
        sr, uhr = sr / scaling, ur.t()
    else:
        raise ValueError(f"init_lora_weights={method!r} does not derive the adapters from the weight")
    root = torch.sqrt(sr)
    return (root[:, None] * uhr).contiguous(), (vr * root[None, :]).contiguous()


def held_dtype(model_config: dict | None) -> torch.dtype | None:
    """The dtype a run held its frozen weights in (``model_config.param_init_type``; None: unknown), which the
    merge and export tools round a stored base to before deriving A0, B0 as the run did."""
    value = (model_config or {}).get("param_init_type")
    return DTYPES.get(str(value).lower()) if value is not None else None
