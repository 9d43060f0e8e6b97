"""Prefix tuning and P-tuning v2 (MindFormers ``pet_type: prefixtuning`` / ``ptuning2``) for mftune models.

What MindFormers 1.3 does, measured (reference/mindformers-prefix-tuning.md), and what this module reproduces:
- a trained table of ``P`` prefix tokens, each ``D = 2 * num_layers * n_kv_heads * head_dim`` wide, optionally
  passed through ``Dense(D, M) -> tanh -> Dense(M, D)`` (prefixtuning always; ptuning2 with
  ``prefix_projection``), computed in float16 with every op rounding its own output, then dropout per batch row;
- token ``t``'s features are ``[layer 0 key | layer 0 value | layer 1 key | ...]``, each block heads first;
- each layer's attention puts the prefix keys/values before the real ones: the keys are not rotated, the real
  tokens keep positions ``0..S-1``, and every query sees the whole prefix (padding included);
- everything else is frozen; the parameters are MindFormers': ``mindpet_delta_<type>_embedding.embedding_table``
  ``[P, D]``, ``mindpet_delta_<type>_trans.0.weight`` ``[M, D]`` / ``.0.bias``, ``..._trans.2.weight`` ``[D, M]`` /
  ``.2.bias``; MindFormers' int64 ``mindpet_delta_<type>_prefix`` (``arange(P)``) is not a parameter here.
Grouped-query attention (MindFormers 1.3 fails on it) is sized by ``n_kv_heads``, as PEFT and MindFormers'
ChatGLM2 P-tuning v2 do; with ``n_kv_heads == num_heads`` that is MindFormers' ``D``.

The encoder is kept out of the model's module tree (``LlamaForCausalLM.set_prefix_encoder``): its two
parts are registered on the model under MindFormers' names, so that names, checkpoints and sharding see
ordinary top-level modules.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from mftune.models.config import ModelArgs
from mftune.models.llama import Fill, LlamaForCausalLM, fill_in_place
from mftune.models.rope import rope_cos_sin, rotate_half
from mftune.pet.freeze import freeze_params
from mftune.pet.prefix_config import PrefixConfig

logger = logging.getLogger("mftune")

EMBEDDING_STD = 0.01  # MindPet's PrefixEmbedding: normal(sigma=0.01)


class PrefixEmbedding(nn.Module):
    """MindPet's ``PrefixEmbedding``: the prefix table ``embedding_table`` ``[P, D]``; ``forward()`` returns it."""

    def __init__(self, num_tokens: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_table = nn.Parameter(torch.empty(num_tokens, dim, device=device, dtype=torch.float32))

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        # a copy: under FSDP2 the gathered table is freed when this module's forward returns
        return self.embedding_table.to(dtype, copy=True)  # (P, D)

    def init_weights(self, fill: Fill | None = None) -> None:
        (fill or fill_in_place)(self.embedding_table, functools.partial(nn.init.normal_, mean=0.0, std=EMBEDDING_STD))


class PrefixDense(nn.Linear):
    """MindSpore's ``nn.Dense`` as it computes in a half dtype: the matmul and the bias add each round to the input's
    dtype (``F.linear`` would round once). The weights are cast to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)

    @torch.no_grad()
    def init_weights(self, fill: Fill | None = None) -> None:
        """MindPet's: weight HeUniform(sqrt(5)) (torch's kaiming-uniform, a=sqrt(5)), bias U(+-1/sqrt(in))."""
        fill = fill or fill_in_place
        fill(self.weight, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
        bound = 1 / math.sqrt(self.in_features)
        fill(self.bias, functools.partial(nn.init.uniform_, a=-bound, b=bound))


class PrefixEncoder(nn.Module):
    """The prefix keys/values of every layer: ``forward(batch_size, training)`` ->
    ``(bs, P, 2 * num_layers, n_kv_heads, head_dim)`` in ``compute_dtype``; ``[:, :, 2 i]`` are layer ``i``'s keys,
    ``[:, :, 2 i + 1]`` its values. Under tensor parallel the output holds this rank's heads
    (``mftune.parallel.tensor_parallel``)."""

    def __init__(self, config: PrefixConfig, num_layers: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_layers, self.n_kv_heads, self.head_dim = num_layers, n_kv_heads, head_dim
        dim = 2 * num_layers * n_kv_heads * head_dim
        self.embedding = PrefixEmbedding(config.num_tokens, dim, device)
        self.trans = None
        if config.projection:
            self.trans = nn.Sequential(PrefixDense(dim, config.hidden, device=device, dtype=torch.float32), nn.Tanh(),
                                       PrefixDense(config.hidden, dim, device=device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, fill: Fill | None = None) -> None:
        """Draw the parameters as MindPet does (table N(0, 0.01), Dense HeUniform / uniform bias)."""
        for sub in self.modules():
            if sub is not self and hasattr(sub, "init_weights"):
                sub.init_weights(fill)

    def forward(self, batch_size: int, training: bool = False) -> torch.Tensor:
        dtype = self.config.compute_torch_dtype
        with torch.autocast(device_type=self.embedding.embedding_table.device.type, enabled=False):
            x = self.embedding(dtype)  # (P, D)
            if self.trans is not None:
                x = self.trans(x)
            x = x.view(1, x.shape[0], 2 * self.num_layers, -1, self.head_dim)  # (1, P, 2L, n_kv_heads, head_dim)
            x = x.expand(batch_size, *x.shape[1:])  # every row the same prefix
            if self.config.dropout > 0 and training:  # a fresh mask per row (MindFormers' Dropout after the tile)
                x = F.dropout(x, self.config.dropout, training=True)
            return x


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    """The prefix encoder applied to ``model`` (None: no prefix method)."""
    encoder = getattr(model, "prefix_encoder", None)
    return encoder if isinstance(encoder, PrefixEncoder) else None


def prefix_modules(model: nn.Module) -> list[nn.Module]:
    """The registered parts of ``model``'s prefix encoder (the table, then the projection if any)."""
    encoder = prefix_encoder(model)
    if encoder is None:
        return []
    return [encoder.embedding] + ([encoder.trans] if encoder.trans is not None else [])


def apply_prefix(model: LlamaForCausalLM, config: PrefixConfig) -> LlamaForCausalLM:
    """Add ``config``'s prefix encoder to ``model`` (any device, meta included) and freeze everything else
    (then ``freeze_include`` / ``freeze_exclude``, as for LoRA)."""
    if prefix_encoder(model) is not None:
        raise ValueError("a prefix method is already applied to this model; apply get_pet_model once")
    args = model.args
    device = model.lm_head.weight.device
    encoder = PrefixEncoder(config, args.num_layers, args.n_kv_heads, args.head_dim, device)
    model.add_module(f"{config.mark}_embedding", encoder.embedding)
    if encoder.trans is not None:
        model.add_module(f"{config.mark}_trans", encoder.trans)
    model.set_prefix_encoder(encoder)
    freeze_params(model, lambda name: name.startswith(config.mark), config.freeze_include, config.freeze_exclude)
    gqa = (f"; sized by n_kv_heads={args.n_kv_heads} (grouped-query attention, which MindFormers 1.3 cannot run "
           f"with {config.pet_type}: PEFT's sizing)" if args.n_kv_heads != args.num_heads else "")
    logger.info("%s: %d prefix tokens of %d values each (keys and values of %d layers)%s, computed in %s, "
                "dropout %g%s", config.pet_type, config.num_tokens, encoder.embedding.embedding_table.shape[1],
                args.num_layers, f", through a projection MLP of {config.hidden}" if config.projection else "",
                config.compute_dtype, config.dropout, gqa)
    return model


@torch.no_grad()
def init_prefix_weights(model: nn.Module, fill: Fill | None = None) -> None:
    """Re-draw the prefix parameters (``PrefixEncoder.reset_parameters``)."""
    encoder = prefix_encoder(model)
    if encoder is not None:
        encoder.reset_parameters(fill)


def rotate_prefix_keys(table: torch.Tensor, args: ModelArgs, position: int, inverse: bool = False) -> torch.Tensor:
    """``table`` ``[P, D]`` (prefix keys/values in the encoder's layout) with every key rotated by RoPE at
    ``position`` (``inverse``: rotated back), in float32; values unchanged.

    PEFT's prefix is a KV cache of P slots, so the real tokens sit at positions P.. and each prefix key is used as
    stored; mftune's (MindFormers') real tokens sit at 0.. . RoPE is relative (``R(a)^T R(b) = R(b - a)``), so
    MindFormers' key ``k`` scores against every query as PEFT's ``R(P) k`` does: export rotates by P, import back.
    DYNAMIC_NTK has frequencies that depend on the length, so no fixed rotation is exact: a ValueError.
    """
    if args.extend_method == "DYNAMIC_NTK":
        raise ValueError("extend_method DYNAMIC_NTK: its RoPE frequencies depend on the sequence length, so a prefix "
                         "cannot be converted between PEFT's positions and MindFormers' exactly")
    x = table.float().reshape(table.shape[0], 2 * args.num_layers, -1, args.head_dim).clone()  # (P, 2L, heads, hd)
    cos, sin = rope_cos_sin(args, 1, x.device, torch.tensor([position], device=x.device))  # (1, hd) each
    keys = x[:, 0::2]  # (P, L, heads, hd)
    x[:, 0::2] = keys * cos + rotate_half(keys) * (-sin if inverse else sin)
    return x.reshape(table.shape)
