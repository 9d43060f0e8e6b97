"""``pet_config`` of MindFormers' prefix tuning (``pet_type: prefixtuning``) and P-tuning v2 (``ptuning2``).

Keys and defaults are MindFormers' ``PrefixTuningConfig`` / ``Ptuning2Config`` (``mindformers/pet/pet_config.py``;
reference/mindformers-prefix-tuning.md). prefixtuning is ptuning2 with the projection always on under other key
names: ``prefix_token_num`` = ``pre_seq_len``, ``mid_dim`` = ``projection_dim``, ``dropout_rate`` =
``dropout_prob``. ``PrefixConfig`` holds the method's own keys; ``num_tokens`` / ``projection`` / ``hidden`` /
``dropout`` read them the same way for both. mftune's extensions: ``compute_dtype`` (MindFormers computes the
prefix in float16 whatever the model's dtypes; ``float32`` computes it as PEFT does) and ``freeze_include`` /
``freeze_exclude`` (as for LoRA).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import torch

from mftune.models.config import DTYPES

PREFIX_TYPES = ("prefixtuning", "ptuning2")
# the method's own keys: (count of prefix tokens, hidden size of the projection MLP, dropout)
_KEYS = {"prefixtuning": ("prefix_token_num", "mid_dim", "dropout_rate"),
         "ptuning2": ("pre_seq_len", "projection_dim", "dropout_prob")}
_OTHER_METHOD = {"prefixtuning": ("pre_seq_len", "projection_dim", "dropout_prob", "prefix_projection"),
                 "ptuning2": ("prefix_token_num", "mid_dim", "dropout_rate")}


@dataclass
class PrefixConfig:
    """``pet_config`` of ``prefixtuning`` or ``ptuning2``; defaults are MindFormers' for each method."""

    pet_type: str = "ptuning2"
    # prefixtuning (PrefixTuningConfig defaults)
    prefix_token_num: int = 128
    mid_dim: int = 512
    dropout_rate: float = 0.1
    # ptuning2 (Ptuning2Config defaults)
    pre_seq_len: int = 128
    prefix_projection: bool = False
    projection_dim: int = 128
    dropout_prob: float = 0.01
    # mftune
    compute_dtype: str = "float16"  # the prefix encoder's dtype (MindFormers: always float16)
    freeze_include: list[str] | None = None
    freeze_exclude: list[str] | None = None

    @classmethod
    def field_names(cls, pet_type: str | None = None) -> list[str]:
        names = [f.name for f in dataclasses.fields(cls)]
        if pet_type is None:
            return names
        return [n for n in names if n not in _OTHER_METHOD[pet_type.lower()]]

    @classmethod
    def from_dict(cls, d: dict[str, Any], key_prefix: str = "model.model_config.pet_config") -> "PrefixConfig":
        errors = prefix_config_errors(d, _err_factory(d, key_prefix))
        if errors:
            raise ValueError(f"{len(errors)} problem(s) in {key_prefix}:\n  " + "\n  ".join(errors))
        return cls(**{**d, "pet_type": str(d.get("pet_type")).lower()})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k in self.field_names(self.pet_type)}

    @property
    def num_tokens(self) -> int:
        return getattr(self, _KEYS[self.pet_type][0])

    @property
    def projection(self) -> bool:
        return self.pet_type == "prefixtuning" or self.prefix_projection

    @property
    def hidden(self) -> int:
        return getattr(self, _KEYS[self.pet_type][1])

    @property
    def dropout(self) -> float:
        return getattr(self, _KEYS[self.pet_type][2])

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype.lower()]

    @property
    def mark(self) -> str:
        """What every parameter name of the method starts with (MindPet's ``mindpet_delta_<pet_type>``)."""
        return f"mindpet_delta_{self.pet_type}"


def training_keys(run_pet_config: dict[str, Any], pet_type: str) -> dict[str, Any]:
    """The run's training settings (its dropout, under ``pet_type``'s name, and freeze_include / freeze_exclude) to
    keep when a checkpoint's prefix method replaces the run's pet_config."""
    dropout = next((run_pet_config[k] for k in ("dropout_prob", "dropout_rate", "lora_dropout") if k in run_pet_config),
                   None)
    out = {k: run_pet_config[k] for k in ("freeze_include", "freeze_exclude") if run_pet_config.get(k) is not None}
    if dropout is not None:
        out[_KEYS[pet_type.lower()][2]] = dropout
    return out


def is_prefix_type(pet_type: Any) -> bool:
    return isinstance(pet_type, str) and pet_type.lower() in PREFIX_TYPES


def _err_factory(pet_config: dict, key_prefix: str):
    def err(key: str, why: str, fix: str) -> str:
        return f"{key_prefix}.{key}={pet_config.get(key)!r} is invalid: {why}. {fix}"
    return err


def prefix_config_errors(pet_config: dict, err) -> list[str]:
    """Every problem of a prefixtuning / ptuning2 ``pet_config`` (``err(key, why, fix)`` formats one)."""
    pet_type = str(pet_config["pet_type"]).lower()
    names = PrefixConfig.field_names(pet_type)
    count_key, hidden_key, dropout_key = _KEYS[pet_type]
    errors = []
    for key in pet_config:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            other = f" (it is {'ptuning2' if pet_type == 'prefixtuning' else 'prefixtuning'}'s)" \
                if key in _OTHER_METHOD[pet_type] else ""
            fix = f"Did you mean {close[0]!r}?" if close else f"Valid keys: {', '.join(names)}."
            errors.append(err(key, f"unknown pet_config key for pet_type {pet_type}{other}", fix))
    for key in (count_key, hidden_key):
        v = pet_config.get(key)
        if key in pet_config and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            errors.append(err(key, "must be a positive integer", f"Use e.g. {key}: 16."))
    v = pet_config.get(dropout_key)
    if dropout_key in pet_config and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
        errors.append(err(dropout_key, "must be a number in [0, 1)", f"Use e.g. {dropout_key}: 0.01 (0 disables it)."))
    if "prefix_projection" in pet_config and not isinstance(pet_config["prefix_projection"], bool):
        errors.append(err("prefix_projection", "must be true or false",
                          "Use prefix_projection: true for the two-layer MLP over the prefix, false to train the "
                          "prefix keys/values directly."))
    v = pet_config.get("compute_dtype")
    if "compute_dtype" in pet_config and (not isinstance(v, str) or v.lower() not in DTYPES):
        errors.append(err("compute_dtype", "must be float16 (MindFormers' prefix), float32 or bfloat16",
                          "Use compute_dtype: float16, or float32 for PEFT's numerics."))
    for key in ("freeze_include", "freeze_exclude"):
        v = pet_config.get(key)
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))):
            errors.append(err(key, "must be a list of fnmatch patterns on parameter names",
                              f"Use e.g. {key}: ['*norm*']."))
    return errors
