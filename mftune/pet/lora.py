"""LoRA for mftune models: swap ``nn.Linear`` -> ``LoRALinear`` in place, freeze, merge.

MindFormers/MindPet semantics (reference/mindformers.md §6.3-§6.5):
- targets: recursion over child modules by *local* attribute name under the backbone
  (``model.model`` for Llama; ``lm_head`` only when a pattern names it, as PEFT allows);
  ``re.match(target_modules, name)``;
- layer: ``y = x W^T + b + dropout(x) A^T B^T * lora_alpha / lora_rank`` (``use_rslora``, PEFT's
  rank-stabilised LoRA: ``/ sqrt(lora_rank)``), A ``[r, in]``
  kaiming-uniform(a=sqrt(5)), B ``[out, r]`` zeros, parameters ``mindpet_delta_lora_a/b``;
- freezing: everything but ``*mindpet_delta_lora*`` (and the modules of PEFT's ``modules_to_save``), then
  ``freeze_include`` / ``freeze_exclude``.
DoRA (``use_dora``) adds a magnitude per output row: ``mftune.pet.dora``.
The layer follows torchtune's ``modules/peft/lora.py``: the base weight Parameter is reused, so
its name (``...attention.wq.weight``) and any checkpoint loading it are unchanged.
"""
from __future__ import annotations

import functools
import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mftune.models.llama import Fill, fill_in_place
from mftune.pet.config import LoraConfig, init_method, is_base_init, lora_scaling
from mftune.pet.freeze import freeze_params, saved_modules, trainable_summary
from mftune.pet.init import gaussian_, initial_factors
from mftune.pet.targets import HEAD, backbone, find_targets, head_target, no_match_message
from mftune.pet.dora import LORA_M, dora_term, init_magnitude, merged_weight, row_norm, unmerged_weight

logger = logging.getLogger("mftune")

LORA_MARK = "mindpet_delta_lora"  # every adapter parameter name contains it (MindPet convention)
LORA_A, LORA_B = f"{LORA_MARK}_a", f"{LORA_MARK}_b"  # LoRALinear's factors A [r, in] and B [out, r]


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a low-rank update; MindPet ``LoRADense`` in PyTorch.

    Invariants: ``weight``/``bias`` are the *same* Parameter objects as the wrapped Linear's
    (no copy, names unchanged); ``mindpet_delta_lora_a`` is ``[rank, in]`` and
    ``mindpet_delta_lora_b`` is ``[out, rank]`` (PEFT's ``lora_A``/``lora_B`` orientation), on the
    base weight's device (meta included). ``merged`` says whether ``W`` already holds ``B A * scaling``;
    forward then adds nothing. Deliberately not an ``nn.Linear`` subclass: code that shards or
    re-initialises every ``nn.Linear`` must not treat A/B as if they were the weight.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 param_init_type: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                 base_init_std: float | None = None, use_rslora: bool = False, use_dora: bool = False,
                 init: str = "default"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.compute_dtype = compute_dtype
        self.base_init_std = base_init_std  # how init_weights() re-draws W; None = nn.Linear's default init
        self.merged = False
        self.weight = base.weight  # same Parameter object: keeps its name, its data and requires_grad
        self.register_parameter("bias", base.bias)
        dtype = param_init_type or base.weight.dtype
        device = base.weight.device
        self.mindpet_delta_lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.mindpet_delta_lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=dtype))
        self.use_dora = use_dora
        if use_dora:  # DoRA's magnitude vector (mftune.pet.dora): starts as the row norms of W
            self.mindpet_delta_lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self._merge_norm: torch.Tensor | None = None  # DoRA: the norm a merge divided by
        self.init = init  # init_method(pet_config.init_lora_weights): default, gaussian, pissa[_niter_N], olora
        if is_base_init(init):  # PiSSA / OLoRA: A0, B0 taken from W, frozen, subtracted (mftune.pet.init)
            self.mindpet_delta_init_a = nn.Parameter(torch.empty(rank, self.in_features, device=device,
                                                                 dtype=torch.float32), requires_grad=False)
            self.mindpet_delta_init_b = nn.Parameter(torch.empty(self.out_features, rank, device=device,
                                                                 dtype=torch.float32), requires_grad=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        if is_base_init(init) and device.type != "meta":  # a model that holds its weights already (the API)
            self.init_from_weight()

    def reset_lora_parameters(self, fill: Fill | None = None) -> None:
        """A: kaiming-uniform(a=sqrt(5)) (MindPet HeUniform(sqrt(5)), PEFT, torch Linear default); B: zeros.
        DoRA's magnitude: the row norms of the current W (``init_magnitude``; again once W is loaded)."""
        fill = fill or fill_in_place
        if self.init == "gaussian":
            fill(self.mindpet_delta_lora_a, functools.partial(gaussian_, rank=self.rank))
        else:
            fill(self.mindpet_delta_lora_a, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
        fill(self.mindpet_delta_lora_b, nn.init.zeros_)
        if is_base_init(self.init):  # until init_from_weight: A0 = B0 = 0, a plain LoRA layer
            fill(self.mindpet_delta_init_a, nn.init.zeros_)
            fill(self.mindpet_delta_init_b, nn.init.zeros_)
        if self.use_dora:
            self.init_magnitude()

    @torch.no_grad()
    def init_from_weight(self, fill: Fill | None = None, keep_adapters: bool = False) -> None:
        """PiSSA / OLoRA: derive A0, B0 from the current (whole) W; A and B start there unless ``keep_adapters``
        (a checkpoint gave their trained values). A collective when W is sharded (it is gathered)."""
        fill = fill or fill_in_place
        weight = self.weight.full_tensor() if isinstance(self.weight, DTensor) else self.weight
        a0, b0 = initial_factors(weight, self.rank, self.scaling, self.init)
        targets = [(self.mindpet_delta_init_a, a0), (self.mindpet_delta_init_b, b0)]
        if not keep_adapters:
            targets += [(self.mindpet_delta_lora_a, a0), (self.mindpet_delta_lora_b, b0)]
        for param, value in targets:
            fill(param, lambda t, value=value: t.copy_(value.to(t.device, t.dtype)))

    def init_magnitude(self) -> None:
        """DoRA: ``m = ||W + s B A||`` per output row (a layer equal to its LoRA form)."""
        init_magnitude(self.weight, self.mindpet_delta_lora_a, self.mindpet_delta_lora_b,
                       self.mindpet_delta_lora_magnitude, self.scaling)

    @torch.no_grad()
    def init_weights(self, fill: Fill | None = None) -> None:
        """Re-draw W (and b) as the model would (``N(0, base_init_std)``, else ``nn.Linear``'s init), then A/B.

        ``LlamaForCausalLM.init_weights`` delegates to this for swapped layers (after meta build + ``to_empty``);
        ``fill`` as there.
        """
        fill = fill or fill_in_place
        if self.base_init_std is not None:
            fill(self.weight, functools.partial(nn.init.normal_, mean=0.0, std=self.base_init_std))
            if self.bias is not None:
                fill(self.bias, nn.init.zeros_)
        else:  # nn.Linear.reset_parameters, drawn in the same order
            fill(self.weight, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                fill(self.bias, functools.partial(nn.init.uniform_, a=-bound, b=bound))
        self.merged = False
        self.reset_lora_parameters(fill)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` (PiSSA / OLoRA: ``(B A - B0 A0) * scaling``) in float32, shape ``[out, in]``."""
        delta = lora_delta_weight(self.mindpet_delta_lora_a, self.mindpet_delta_lora_b, self.scaling)
        if is_base_init(self.init):
            delta = delta - lora_delta_weight(self.mindpet_delta_init_a, self.mindpet_delta_init_b, self.scaling)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """``W += B A * scaling`` (DoRA: ``W = m / ||W + dW|| * (W + dW)``), float32 arithmetic, cast back to W's
        dtype. Merging twice is a no-op."""
        if self.merged:
            logger.warning("LoRA layer is already merged; merge() ignored")
            return
        if self.use_dora:
            merged, self._merge_norm = merged_weight(self.weight, self.mindpet_delta_lora_magnitude,
                                                     self.delta_weight())
        else:
            merged = self.weight.float() + self.delta_weight()
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= B A * scaling`` (DoRA: the merge's norm multiplied back); exact up to rounding in W's dtype.
        Unmerging an unmerged layer is a no-op."""
        if not self.merged:
            logger.warning("LoRA layer is not merged; unmerge() ignored")
            return
        if self.use_dora:
            weight = unmerged_weight(self.weight, self.mindpet_delta_lora_magnitude, self._merge_norm,
                                     self.delta_weight())
            self._merge_norm = None
        else:
            weight = self.weight.float() - self.delta_weight()
        self.weight.copy_(weight.to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            return self._forward(x, None)
        # pet_config.compute_dtype: MindPet casts x, W, b, A, B to it and the result back to x's dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x.to(self.compute_dtype), self.compute_dtype).to(x.dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        lora_a, lora_b = self.mindpet_delta_lora_a, self.mindpet_delta_lora_b
        if dtype is not None:
            weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        out = F.linear(x, weight, bias)  # (..., out)
        if self.merged:
            return out
        h = self.lora_dropout(x)
        if h.dtype != lora_a.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(lora_a.dtype)  # e.g. bf16 activations, fp32 adapters, no autocast (as PEFT does)
        delta = F.linear(F.linear(h, lora_a), lora_b)  # (..., r) -> (..., out)
        if is_base_init(self.init):  # W_res x = W x - s B0 A0 x, on the input without dropout (as PEFT's W_res)
            init_a, init_b = self.mindpet_delta_init_a, self.mindpet_delta_init_b
            x0 = x if x.dtype == lora_a.dtype or torch.is_autocast_enabled(x.device.type) else x.to(lora_a.dtype)
            delta = delta - F.linear(F.linear(x0, init_a.to(lora_a.dtype)), init_b.to(lora_b.dtype))
        if not self.use_dora:
            return out + (delta * self.scaling).to(out.dtype)
        magnitude = self.mindpet_delta_lora_magnitude
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        base = (out if bias is None else out - bias) if no_dropout else None
        norm = self._row_norm(weight, lora_a, lora_b)
        return out + dora_term(h, weight, magnitude, norm, delta, self.scaling, base).to(out.dtype)

    def _row_norm(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + s B A||``; without autograd (decoding, eval) kept until W, A or B change, so that each
        generated token does not recompute an ``[out, in]`` product per layer."""
        params = (self.weight, self.mindpet_delta_lora_a, self.mindpet_delta_lora_b)  # not the compute-dtype copies
        if torch.is_grad_enabled() or any(isinstance(t, DTensor) for t in params):
            return row_norm(weight, lora_a, lora_b, self.scaling)
        key = tuple((t.data_ptr(), t._version) for t in params) + (weight.dtype,)
        cached = self.__dict__.get("_norm_cache")
        if cached is None or cached[0] != key:
            cached = (key, row_norm(weight, lora_a, lora_b, self.scaling))
            self.__dict__["_norm_cache"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}, "
                f"merged={self.merged}")


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``B [out, r] @ A [r, in] * scaling`` in float32 (the merge arithmetic of transform_ckpt_lora and PEFT)."""
    return (lora_b.float() @ lora_a.float()) * scaling


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, pet_config: dict | LoraConfig) -> nn.Module:
    """Apply LoRA as ``pet_config`` says to ``model`` in place and return it (``mftune.pet.get_pet_model``).

    Swaps matching ``nn.Linear`` children for ``LoRALinear``, then freezes everything but the
    adapters (plus ``freeze_include``/``freeze_exclude``). Works on a meta-device model; call
    ``init_lora_weights`` after ``to_empty`` to give the adapters their initial values.
    """
    config = pet_config if isinstance(pet_config, LoraConfig) else LoraConfig.from_dict(dict(pet_config))
    if lora_layers(model):
        raise ValueError("LoRA is already applied to this model (it has LoRALinear layers); apply get_pet_model once")
    root, root_name = backbone(model)
    targets = [re.compile(p) for p in config.target_patterns]
    excludes = [re.compile(p) for p in config.exclude_patterns]
    init_std = getattr(getattr(model, "config", None), "initializer_range", None)
    swapped = _swap(root, root_name, config, targets, excludes, init_std)
    if head_target(model, root, targets, excludes):  # LoRA on lm_head, named in target_modules (PEFT allows it)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise ValueError(f"pet_config.target_modules={config.target_modules!r} is invalid with "
                             f"tie_word_embeddings: lm_head is the embedding table, which LoRA would change too. "
                             f"Leave lm_head out of target_modules, or untie them.")
        model.lm_head = _lora_layer(model.lm_head, config, init_std)
        swapped.append(HEAD)
    if not swapped:
        raise ValueError(no_match_message(root, root_name, config))
    freeze_lora(model, config.freeze_include, config.freeze_exclude, config.modules_to_save)
    _check_base_init_frozen(model, config)
    logger.info("LoRA: replaced %d Linear layers (target_modules=%r, exclude_layers=%r, rank %d, alpha %g, "
                "scaling %g%s%s, dropout %g%s): %s%s", len(swapped), config.target_modules, config.exclude_layers,
                config.lora_rank, config.lora_alpha, config.scaling, " (rsLoRA: alpha / sqrt(rank))"
                if config.use_rslora else "", ", DoRA" if config.use_dora else "", config.lora_dropout,
                f", modules_to_save {config.modules_to_save}" if config.modules_to_save else "",
                ", ".join(swapped[:4]), ", ..." if len(swapped) > 4 else "")
    logger.info(trainable_summary(model))
    return model


def _swap(module: nn.Module, prefix: str, config: LoraConfig,
          targets: list[re.Pattern], excludes: list[re.Pattern], init_std: float | None) -> list[str]:
    """MindFormers ``recursive_replace_dense_cell``: returns the dotted names of the swapped layers."""
    swapped = []
    for parent, name, child, full in find_targets(module, prefix, targets, excludes):
        setattr(parent, name, _lora_layer(child, config, init_std))
        swapped.append(full)
    return swapped


def _check_base_init_frozen(model: nn.Module, config: LoraConfig) -> None:
    """PiSSA / OLoRA: A0 and B0 stay frozen whatever freeze_exclude / modules_to_save say, and the adapted weight
    must stay frozen too (A0, B0 are derived from it whenever it is loaded: a trained W would give other ones)."""
    for name, layer in lora_layers(model):
        if not is_base_init(layer.init):
            continue
        layer.mindpet_delta_init_a.requires_grad_(False)
        layer.mindpet_delta_init_b.requires_grad_(False)
        if layer.weight.requires_grad:
            raise ValueError(f"pet_config.init_lora_weights={config.init_lora_weights!r} is invalid with {name}.weight "
                             f"trainable (freeze_exclude={config.freeze_exclude!r}, modules_to_save="
                             f"{config.modules_to_save!r}): its adapters are taken from that weight. Keep the adapted "
                             f"layers' weights frozen, or use init_lora_weights: true.")


def _lora_layer(child: nn.Linear, config: LoraConfig, init_std: float | None) -> LoRALinear:
    return LoRALinear(child, config.lora_rank, config.lora_alpha, config.lora_dropout, config.param_dtype,
                      config.compute_torch_dtype, init_std, config.use_rslora, config.use_dora,
                      init_method(config.init_lora_weights))


def freeze_lora(model: nn.Module, freeze_include: list[str] | str | None = None,
                freeze_exclude: list[str] | str | None = None, modules_to_save: list[str] | None = None) -> None:
    """MindPet ``freeze_delta(model, 'lora', include, exclude)``.

    All parameters frozen except ``*mindpet_delta_lora*`` and those of ``modules_to_save`` (``saved_modules``);
    then a parameter whose full name matches a ``freeze_include`` pattern (fnmatch) and no ``freeze_exclude``
    pattern is frozen, one matching only ``freeze_exclude`` is made trainable, one matching both is left as it is.
    """
    modules = saved_modules(model, modules_to_save or [])
    adapted = [m for m in modules if isinstance(model.get_submodule(m), LoRALinear)
               or any(isinstance(sub, LoRALinear) for sub in model.get_submodule(m).modules())]
    if adapted:  # the module would train in full and carry an adapter: one of the two is a mistake
        raise ValueError(f"pet_config.modules_to_save={modules_to_save!r} is invalid: {adapted[0]} holds LoRA layers "
                         f"(target_modules), and a module trains either in full or through its adapter. Leave it out "
                         f"of one of the two.")
    saved = {f"{m}.{n}" for m in modules for n, _ in model.get_submodule(m).named_parameters()}
    freeze_params(model, lambda name: LORA_MARK in name or name in saved, freeze_include, freeze_exclude)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight (reversible with ``unmerge_lora``)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, mftune names (``model.layers.0.attention.wq.mindpet_delta_lora_a``)."""
    return {k: v for k, v in model.state_dict().items() if LORA_MARK in k}


def init_dora_magnitudes(model: nn.Module, loaded: list[str] | set[str] = ()) -> None:
    """Set the DoRA magnitudes not in ``loaded`` (parameter names a checkpoint provided) to the row norms of
    their layers' current weights: after the base weights are loaded. A collective under FSDP2."""
    keep = set(loaded)
    for name, layer in lora_layers(model):
        if layer.use_dora and f"{name}.{LORA_M}" not in keep:
            layer.init_magnitude()


def init_from_weights(model: nn.Module, loaded: list[str] | set[str] = (), fill: Fill | None = None) -> None:
    """Everything of the adapters that comes from the loaded base weights: DoRA magnitudes (``init_dora_magnitudes``)
    and PiSSA / OLoRA's A0, B0, with A and B starting there unless ``loaded`` (the names a checkpoint provided) has
    them. A collective under FSDP2 and tensor parallel (``fill``: as in ``init_weights``)."""
    init_dora_magnitudes(model, loaded)
    init_base_factors(model, loaded, fill)


def init_base_factors(model: nn.Module, loaded: list[str] | set[str] = (), fill: Fill | None = None) -> None:
    """PiSSA / OLoRA's A0, B0 from the current weights, A and B starting there unless ``loaded`` has them. A
    collective under FSDP2 and tensor parallel."""
    keep = set(loaded)
    for name, layer in lora_layers(model):
        if is_base_init(layer.init):
            layer.init_from_weight(fill, keep_adapters=f"{name}.{LORA_A}" in keep)


@torch.no_grad()
def init_lora_weights(model: nn.Module, fill: Fill | None = None) -> nn.Module:
    """Re-initialise every adapter (A kaiming-uniform, B zeros): after ``to_empty`` of a meta-built
    model. ``fill`` as in ``LlamaForCausalLM.init_weights``."""
    for _, layer in lora_layers(model):
        layer.reset_lora_parameters(fill)
    return model
