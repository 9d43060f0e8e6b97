"""A Hugging Face model directory as a run's model (``pretrained_model_dir``, MindFormers r1.6+): the
architecture from its config.json, merged with the YAML's ``model.model_config``.

MindFormers merges the two with the YAML winning (``build_config.merge_model_config``:
``hf_dict.update(model_config)``), so a Llama 2 YAML over a Llama 3 directory quietly builds the wrong
model. mftune fills the keys the YAML leaves out from config.json and refuses an architecture key
(``recorded_config.COMPARED``: sizes, head counts, RoPE base and scaling, norm epsilon, tied embeddings)
that disagrees, naming both values. Other keys the YAML gives are honoured; token ids that differ from
config.json are kept with a warning. Not architecture, so not from config.json:

- ``seq_length``: the YAML's, else ``DEFAULT_SEQ_LENGTH`` capped at max_position_embeddings (config.json's
  max_position_embeddings is what the model was trained for, often 128K: not a training length).
- dtypes: ``compute_dtype`` the YAML's, else config.json's ``torch_dtype`` on a GPU (float16 becomes
  bfloat16 where the GPU has it: float16 needs loss scaling) and float32 on a CPU (CPU half-precision
  matmuls are slower than float32 and lose accuracy); ``param_init_type`` the YAML's, else the compute
  dtype (a half-precision ``param_init_type`` alone sets the compute dtype too).
- ``mask_pad_token``: config.json's (False: transformers hides padding by attention mask only), unless
  the YAML names ``pad_token_id`` (a MindFormers YAML): then MindFormers' pad masking, as before.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mftune.checkpoint.names import hf_config_to_model_config
from mftune.checkpoint.recorded_config import mismatches
from mftune.errors import CheckpointError, ConfigError
from mftune.models.config import LlamaConfig, model_config_errors

DEFAULT_SEQ_LENGTH = LlamaConfig.seq_length  # 2048
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class MergedModelConfig:
    model_config: dict[str, Any]  # the run's model.model_config
    from_directory: list[str] = field(default_factory=list)  # keys taken from config.json
    notes: list[str] = field(default_factory=list)  # choices made (logged)
    warnings: list[str] = field(default_factory=list)  # YAML values kept over config.json's (logged as warnings)


def directory_model_config(directory: str, key: str = "pretrained_model_dir") -> dict[str, Any]:
    """``directory``'s config.json as ``model_config`` keys; CheckpointError names ``key`` and the fix."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"{key}={directory} is invalid: {path} cannot be read ({exc.strerror}). Pass a "
                              "Hugging Face model directory (config.json, tokenizer files, *.safetensors).") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{key}={directory} is invalid: {path} is not JSON ({exc}).") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{key}={directory} is invalid: {path} is not a JSON object.")
    try:
        return hf_config_to_model_config(hf)
    except ValueError as exc:
        raise CheckpointError(f"{key}={directory}: {exc}") from None


def merge_model_config(given: dict[str, Any], directory_config: dict[str, Any], source: str, *,
                       gpu: bool, bf16: bool = True) -> MergedModelConfig:
    """The run's ``model_config``: ``given`` (the YAML's keys) completed from ``directory_config``
    (``directory_model_config`` of ``source``). ConfigError lists every YAML architecture key that
    disagrees with config.json, and every rule the merged values break. ``gpu``: the run computes on one;
    ``bf16``: that GPU computes in bfloat16."""
    out = MergedModelConfig(dict(given))
    mc = out.model_config
    for k, value in directory_config.items():
        if k in ("seq_length", "param_init_type") or (k == "mask_pad_token" and "pad_token_id" in given):
            continue  # below; a YAML naming its pad id keeps MindFormers' pad masking
        if k not in given:
            mc[k] = value
            out.from_directory.append(k)
        elif k in TOKEN_ID_KEYS and given[k] != value:
            out.warnings.append(f"model.model_config.{k}={given[k]!r} is used, not config.json's {value!r}")
    _merge_seq_length(out, given, directory_config)
    _merge_dtypes(out, given, directory_config.get("param_init_type", "float32"), gpu, bf16)
    errors = [f"model.model_config.{k}={ours!r} is invalid: {source}/config.json has {k}={theirs!r}. Remove "
              f"{k} from model_config (config.json's value is then used), or use the directory of that model."
              for k, ours, theirs in mismatches(directory_config, _llama_config(mc))]
    errors += [f"model.model_config.{e}" for e in model_config_errors(_llama_config(mc))]
    if errors:
        raise ConfigError(errors)
    return out


def _merge_seq_length(out: MergedModelConfig, given: dict[str, Any], directory_config: dict[str, Any]) -> None:
    if "seq_length" in given:
        return
    longest = directory_config.get("max_position_embedding")
    out.model_config["seq_length"] = min(DEFAULT_SEQ_LENGTH, longest) if isinstance(longest, int) else \
        DEFAULT_SEQ_LENGTH
    out.notes.append(f"seq_length {out.model_config['seq_length']} (model_config gives none; config.json's "
                     f"max_position_embeddings is {longest}): set model.model_config.seq_length to train longer")


def _merge_dtypes(out: MergedModelConfig, given: dict[str, Any], stored: str, gpu: bool, bf16: bool) -> None:
    """compute_dtype and param_init_type, each the YAML's when given (module docstring)."""
    mc, why = out.model_config, ""
    if "compute_dtype" not in given:
        if given.get("param_init_type") not in (None, "float32", "fp32"):  # half parameters: autocast in their dtype
            mc["compute_dtype"] = given["param_init_type"]
        elif not gpu:
            mc["compute_dtype"] = "float32"
        elif stored in ("float16", "fp16") and bf16:
            mc["compute_dtype"], why = "bfloat16", ": bfloat16 has float32's range, float16 would need loss scaling"
        else:
            mc["compute_dtype"] = stored
    if "param_init_type" not in given:  # one dtype for the weights and the matmuls: no second rounding
        mc["param_init_type"] = mc["compute_dtype"]
    if "compute_dtype" not in given or "param_init_type" not in given:
        device = "GPU" if gpu else "CPU"
        out.notes.append(f"compute_dtype {mc['compute_dtype']}, param_init_type {mc['param_init_type']} "
                         f"({device}; config.json's torch_dtype is {stored}{why}): set model.model_config."
                         f"compute_dtype / param_init_type to choose")


def _llama_config(mc: dict[str, Any]) -> LlamaConfig:
    known = {k: v for k, v in mc.items() if k in LlamaConfig.field_names()}
    return LlamaConfig(**known)
