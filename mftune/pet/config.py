"""``model.model_config.pet_config``: MindFormers' LoRA keys, defaults and checks.

Keys and defaults are MindFormers' ``LoraConfig`` (reference/mindformers.md §6.2); the value
checks are MindPet ``LoRADense``'s (rank a positive int, alpha != 0, 0 <= dropout < 1, dtypes
fp16/fp32/bf16), plus the ones MindFormers leaves to a later crash (regexes that do not compile,
missing ``target_modules``). ``pet_config_errors`` reports every problem at once, each as
``"<key_prefix>.<key>=<value> is invalid: <why>. <fix>"``; ``mftune.config`` imports it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from mftune.models.config import DTYPES
from mftune.pet.prefix_config import PREFIX_TYPES, PrefixConfig, is_prefix_type, prefix_config_errors
from mftune.pet.slora import SLoraConfig, slora_config_errors

DEFAULT_KEY_PREFIX = "model.model_config.pet_config"

# PET methods MindFormers knows (PetType enum, PetModel mapping) that mftune does not implement.
UNSUPPORTED_PET_TYPES = ("adapter", "low_rank_adapter")
SUPPORTED_PET_TYPES = ("lora", *PREFIX_TYPES, "slora")

# dtype strings accepted for param_init_type / compute_dtype (MindPet: fp16, fp32, bf16): the model's
# table, so that pet_config, model_config and config validation accept the same names.
PET_DTYPES: dict[str, torch.dtype] = DTYPES

EXAMPLE_TARGETS = ".*wq|.*wk|.*wv|.*wo"


@dataclass
class LoraConfig:
    """``pet_config`` with ``pet_type: lora``. Defaults are MindFormers' (``mindformers/pet/pet_config.py``)."""

    pet_type: str = "lora"  # only "lora" is implemented; other MindFormers types are rejected
    lora_rank: int = 8  # r: rows of A [r, in], columns of B [out, r]
    lora_alpha: float = 16  # scaling = lora_alpha / lora_rank (/ sqrt(lora_rank) with use_rslora)
    lora_dropout: float = 0.01  # dropout on the LoRA branch input only; 0 -> identity
    use_rslora: bool = False  # rank-stabilised LoRA (mftune and PEFT, not MindFormers): scaling = alpha / sqrt(rank)
    use_dora: bool = False  # DoRA (mftune and PEFT): a trained magnitude per output row (mftune.pet.dora)
    init_lora_weights: bool | str = True  # PEFT's: true (A kaiming), gaussian, pissa, pissa_niter_N, olora (pet.init)
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapters (PEFT's key), e.g. lm_head
    lora_plus_lr_ratio: float | None = None  # LoRA+ (mftune and PEFT): B learns at this multiple of the learning rate
    lora_a_init: str | None = "normal"  # accepted and ignored, as in MindFormers: A is kaiming-uniform(a=sqrt(5))
    lora_b_init: str | None = "zero"  # accepted and ignored, as in MindFormers: B is zeros
    param_init_type: str | None = None  # dtype of A/B; None = the replaced layer's weight dtype
    compute_dtype: str | None = None  # dtype of the LoRA layer's matmuls; None = whatever autocast/inputs give
    target_modules: str | list[str] | None = None  # regex(es), re.match'ed against local attribute names; required
    exclude_layers: str | list[str] | None = None  # regexes; a child whose local name matches is not visited
    freeze_include: list[str] | None = None  # fnmatch patterns on parameter names: frozen after the LoRA freeze
    freeze_exclude: list[str] | None = None  # fnmatch patterns on parameter names: made trainable

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], key_prefix: str = DEFAULT_KEY_PREFIX) -> "LoraConfig":
        """Validate and build; a ValueError lists every problem found (see ``pet_config_errors``)."""
        check_pet_config(d, key_prefix)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.lora_rank, self.use_rslora)

    @property
    def target_patterns(self) -> list[str]:
        return _as_list(self.target_modules)

    @property
    def exclude_patterns(self) -> list[str]:
        return _as_list(self.exclude_layers)

    @property
    def param_dtype(self) -> torch.dtype | None:
        return None if self.param_init_type is None else PET_DTYPES[self.param_init_type.lower()]

    @property
    def compute_torch_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else PET_DTYPES[self.compute_dtype.lower()]


def pet_config_from_dict(d: dict[str, Any] | LoraConfig | PrefixConfig | SLoraConfig,
                         key_prefix: str = DEFAULT_KEY_PREFIX) -> LoraConfig | PrefixConfig | SLoraConfig:
    """The validated config of ``d``'s method: ``PrefixConfig`` for prefixtuning / ptuning2, ``SLoraConfig`` for
    slora, else ``LoraConfig``."""
    if isinstance(d, (LoraConfig, PrefixConfig, SLoraConfig)):
        return d
    check_pet_config(d, key_prefix)
    if is_prefix_type(d.get("pet_type")):
        return PrefixConfig(**{**d, "pet_type": d["pet_type"].lower()})
    if is_slora(d):
        return SLoraConfig(**{**d, "pet_type": "slora"})
    return LoraConfig(**d)


def check_pet_config(d: dict[str, Any], key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
    """A ValueError listing every problem of ``d`` (``pet_config_errors``), if it has any."""
    errors = pet_config_errors(dict(d), key_prefix)
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {key_prefix}:\n  " + "\n  ".join(errors))


def is_slora(pet_config: dict | None) -> bool:
    """Whether a pet_config mapping is MindFormers' multi-adapter S-LoRA (``mftune.pet.slora``)."""
    return bool(pet_config) and str(pet_config.get("pet_type", "lora")).lower() == "slora"


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor on ``B A``: ``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _as_list(value: str | list[str] | None) -> list[str]:
    """A single string is one pattern (MindFormers would iterate its characters; we do not)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def pet_config_errors(pet_config: dict, key_prefix: str = DEFAULT_KEY_PREFIX) -> list[str]:
    """Every problem in a ``pet_config`` mapping, one message each (empty list = valid).

    Message format: ``"<key_prefix>.<key>=<value> is invalid: <why>. <fix>"``.
    A MindFormers PET type that mftune does not implement yields that single error: the other
    keys belong to that method and checking them against LoRA's would only add noise.
    """
    if not isinstance(pet_config, dict):
        return [f"{key_prefix}={pet_config!r} is invalid: pet_config must be a mapping. "
                f"Write e.g. {{pet_type: lora, lora_rank: 16, target_modules: '{EXAMPLE_TARGETS}'}}."]

    def err(key: str, why: str, fix: str) -> str:
        return f"{key_prefix}.{key}={pet_config.get(key)!r} is invalid: {why}. {fix}"

    pet_type = pet_config.get("pet_type", "lora")
    if isinstance(pet_type, str) and pet_type.lower() in UNSUPPORTED_PET_TYPES:
        return [err("pet_type", f"the MindFormers PET method {pet_type!r} is not supported yet by mftune "
                    f"(supported: {', '.join(SUPPORTED_PET_TYPES)})", "Use pet_type: lora.")]
    if is_prefix_type(pet_type):
        return prefix_config_errors(pet_config, err)
    if is_slora(pet_config):
        return slora_config_errors(pet_config, err)
    return _key_errors(pet_config, err) + _value_errors(pet_config, err) + _pattern_key_errors(pet_config, err)


def _key_errors(pet_config: dict, err) -> list[str]:
    """The PET method and the key names."""
    errors: list[str] = []
    pet_type = pet_config.get("pet_type", "lora")
    if not isinstance(pet_type, str):
        errors.append(err("pet_type", "must be a string", "Use pet_type: lora."))
    elif pet_type.lower() not in SUPPORTED_PET_TYPES:
        close = difflib.get_close_matches(pet_type.lower(), SUPPORTED_PET_TYPES + UNSUPPORTED_PET_TYPES, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        errors.append(err("pet_type", "unknown PET method",
                          f"{hint}Use pet_type: lora, prefixtuning, ptuning2 or slora."))
    names = LoraConfig.field_names()
    for key in pet_config:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            fix = f"Did you mean {close[0]!r}?" if close else f"Valid keys: {', '.join(names)}."
            errors.append(err(key, "unknown pet_config key for pet_type lora", fix))
    return errors


def _value_errors(pet_config: dict, err) -> list[str]:
    """Rank, alpha, dropout, the ignored init names, dtypes."""
    errors: list[str] = []
    if "lora_rank" in pet_config:
        v = pet_config["lora_rank"]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            errors.append(err("lora_rank", "the LoRA rank must be a positive integer", "Use e.g. lora_rank: 8."))
    if "lora_alpha" in pet_config:
        v = pet_config["lora_alpha"]
        if not _is_number(v) or not math.isfinite(v):
            errors.append(err("lora_alpha", "must be a finite number", "Use e.g. lora_alpha: 16."))
        elif v == 0:
            errors.append(err("lora_alpha", "lora_alpha must not be 0 (the adapter would do nothing)",
                              "Use e.g. lora_alpha: 16 (scaling = lora_alpha / lora_rank)."))
    if "lora_dropout" in pet_config:
        v = pet_config["lora_dropout"]
        if not _is_number(v) or not 0 <= v < 1:
            errors.append(err("lora_dropout", "must be a number in [0, 1)",
                              "Use e.g. lora_dropout: 0.05 (0 disables it)."))
    if "use_dora" in pet_config and not isinstance(pet_config["use_dora"], bool):
        errors.append(err("use_dora", "must be true or false", "Use use_dora: true for DoRA, false for LoRA."))
    if "use_rslora" in pet_config and not isinstance(pet_config["use_rslora"], bool):
        errors.append(err("use_rslora", "must be true or false",
                          "Use use_rslora: true for scaling lora_alpha / sqrt(lora_rank), false for "
                          "lora_alpha / lora_rank."))
    v = pet_config.get("modules_to_save")
    if v is not None and not (isinstance(v, list) and v and all(isinstance(m, str) and m for m in v)):
        errors.append(err("modules_to_save", "must be a list of module names",
                          "Use e.g. modules_to_save: [lm_head] (module names, or their last part), or remove it."))
    errors += _init_errors(pet_config, err)
    v = pet_config.get("lora_plus_lr_ratio")
    if v is not None and (not _is_number(v) or not math.isfinite(v) or v <= 0):
        errors.append(err("lora_plus_lr_ratio", "must be a positive number (B's learning rate over A's)",
                          "Use e.g. lora_plus_lr_ratio: 16 (LoRA+), or remove it for plain LoRA."))
    for key in ("lora_a_init", "lora_b_init"):
        if pet_config.get(key) is not None and not isinstance(pet_config[key], str):
            errors.append(err(key, "must be a string (MindFormers ignores it; A is kaiming-uniform, B zeros)",
                              f"Remove {key}."))
    for key in ("param_init_type", "compute_dtype"):
        v = pet_config.get(key)
        if v is not None and (not isinstance(v, str) or v.lower() not in PET_DTYPES):
            close = difflib.get_close_matches(str(v).lower(), list(PET_DTYPES), n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            errors.append(err(key, "must be float32, float16 or bfloat16",
                              f"{hint}Or remove it to inherit the layer's dtype."))
    return errors


def _init_errors(pet_config: dict, err) -> list[str]:
    """init_lora_weights (PEFT's key and values)."""
    if "init_lora_weights" not in pet_config:
        return []
    v = pet_config["init_lora_weights"]
    if v is True or (isinstance(v, str) and init_method(v) is not None):
        if pet_config.get("use_dora") and is_base_init(init_method(v)):
            return [err("init_lora_weights", f"{v} with use_dora is not supported by mftune",
                        "Use one of the two: init_lora_weights: true for DoRA, or use_dora: false for PiSSA/OLoRA.")]
        return []
    why = ("false leaves B random, so the adapted model is not the base model (PEFT's testing setting)" if v is False
           else "must be true, gaussian, pissa, pissa_niter_<iterations> or olora")
    return [err("init_lora_weights", why, "Use e.g. init_lora_weights: pissa, or remove it (A kaiming, B zeros).")]


def init_method(value: bool | str) -> str | None:
    """``init_lora_weights`` normalised: "default" (true), "gaussian", "pissa", "pissa_niter_<n>", "olora"; None when
    it is not one of PEFT's values mftune implements."""
    if value is True:
        return "default"
    if not isinstance(value, str):
        return None
    v = value.lower()
    if v in ("gaussian", "pissa", "olora"):
        return v
    if v.startswith("pissa_niter_") and v[len("pissa_niter_"):].isdigit() and int(v[len("pissa_niter_"):]) > 0:
        return v
    return None


def is_base_init(method: str | None) -> bool:
    """Whether an ``init_method`` takes the adapters from the base weight (PiSSA, OLoRA: ``mftune.pet.init``)."""
    return method is not None and method.startswith(("pissa", "olora"))


def _pattern_key_errors(pet_config: dict, err) -> list[str]:
    """target_modules (required), exclude_layers, freeze_include / freeze_exclude."""
    errors: list[str] = []
    target = pet_config.get("target_modules")
    if target is None:
        errors.append(err("target_modules",
                          "LoRA needs target modules (MindFormers: 'No target modules for lora layer.')",
                          f"Set a regex matched against layer attribute names, "
                          f"e.g. target_modules: '{EXAMPLE_TARGETS}'."))
    else:
        errors += _pattern_errors(err, "target_modules", target, allow_empty=False)
    if pet_config.get("exclude_layers") is not None:
        errors += _pattern_errors(err, "exclude_layers", pet_config["exclude_layers"], allow_empty=True)
    for key in ("freeze_include", "freeze_exclude"):
        v = pet_config.get(key)
        patterns_ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))
        if v is not None and not patterns_ok:
            errors.append(err(key, "must be a list of fnmatch patterns on parameter names",
                              f"Use e.g. {key}: ['*norm*']."))
    return errors


def _pattern_errors(err, key: str, value: Any, allow_empty: bool) -> list[str]:
    """A regex string or a list of them; each must compile."""
    if isinstance(value, str):
        patterns = [value]
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        patterns = value
    else:
        return [err(key, "must be a regex string or a list of regex strings", f"Use e.g. {key}: '{EXAMPLE_TARGETS}'.")]
    if not allow_empty and (not patterns or any(p == "" for p in patterns)):
        return [err(key, "an empty pattern matches every layer name", f"Use e.g. {key}: '{EXAMPLE_TARGETS}'.")]
    out = []
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            out.append(err(key, f"{p!r} is not a valid regular expression ({e})",
                           "Fix the pattern (Python re syntax, matched with re.match against the attribute name)."))
    return out
