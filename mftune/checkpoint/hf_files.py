"""What a Hugging Face export copies from the base model's Hugging Face directory, besides the weights.

``convert_weight.py --reversed``, ``transform_ckpt_lora.py --output_format hf`` and ``export_adapter.py``
write directories that transformers must load with no hand work: ``AutoTokenizer.from_pretrained`` needs
the tokenizer files (and the chat template), ``generate`` the generation_config, ``AutoModelForCausalLM``
the config.json of the model as its authors wrote it (rope_scaling, eos lists, ... that mftune's
model_config does not carry). They all come from "the base": a directory given on the command line
(``--base_model_dir`` / ``--tokenizer_dir``), else the Hugging Face directory the checkpoint records as
its origin (``recorded_hf_dir``: a converted file's ``source``, a merge's ``base``, a LoRA run's
``base_checkpoint``, a PEFT adapter's ``base_model_name_or_path``, followed until one is a directory).

Invariants:
- Files are copied byte for byte, each written atomically (``mftune.fileio``).
- config.json is the base's, changed only where the export changed the model: its dtype when the
  weights were cast. A base whose architecture differs from the exported weights' model config is an
  error naming the key and both values (it is not this model's base).
- What could not be copied is said in the report (``summary``), never left out silently.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from mftune.checkpoint.formats import checkpoint_header, huggingface
from mftune.checkpoint.names import HF_TO_MODEL_CONFIG, hf_config_to_model_config
from mftune.checkpoint.recorded_config import mismatches
from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig
from mftune.fileio import atomic_open, atomic_path

logger = logging.getLogger("mftune")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")
# what AutoTokenizer needs: one of these (tokenizer_config.json alone names a class but holds no vocabulary)
_VOCABULARY = ("tokenizer.json", "tokenizer.model")
# config.json keys that fix the weights' shapes or the numerics: they must agree with the exported model
# model_config architecture key (recorded_config.COMPARED) -> its config.json name, for messages
HF_NAME = {**{mc: hf for hf, mc in HF_TO_MODEL_CONFIG.items()}, "theta": "rope_theta",
           "extend_method": "rope_scaling", "scaling_factor": "rope_scaling"}
_ADAPTER_CONFIG = "adapter_config.json"
_MAX_CHAIN = 16
_HF_FILE = re.compile(r"^(config\.json|(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?)$")


@dataclass
class HFBase:
    """Where an export's extra files come from: ``directory`` (None: nowhere known) and how it was found."""
    directory: str | None
    how: str  # "given as --base_model_dir", "recorded by <checkpoint>", or why none is known


@dataclass
class CopyReport:
    """What an export took from its base (file names), and what it lacks."""
    base: HFBase
    copied: list[str] = field(default_factory=list)
    config: str = ""  # "copied", "copied, dtype changed to X", "derived from the model config"
    missing: list[str] = field(default_factory=list)  # one sentence per consequence


def _parent(path: str) -> str | None:
    """The checkpoint a checkpoint records as its origin, or None."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, _ADAPTER_CONFIG)):
        try:
            with open(os.path.join(path, _ADAPTER_CONFIG)) as f:
                return json.load(f).get("base_model_name_or_path") or None
        except (OSError, ValueError, AttributeError):
            return None
    try:
        header = checkpoint_header(path)
    except (CheckpointError, OSError, ValueError):
        return None
    source = header.get("source") if isinstance(header.get("source"), dict) else {}
    if source.get("format") == "huggingface":
        return source.get("path")
    if source.get("base"):  # a merged model: its base's origin
        return source["base"]
    recorded = header.get("base_checkpoint")
    return recorded.get("path") if isinstance(recorded, dict) else None


def recorded_hf_dir(path: str) -> str | None:
    """The Hugging Face directory ``path`` is, or that its chain of recorded origins leads to (None: none)."""
    seen: set[str] = set()
    while path and len(seen) < _MAX_CHAIN and os.path.exists(path):
        path = os.path.abspath(path)
        if path in seen:
            return None
        seen.add(path)
        if os.path.isdir(path) and huggingface.matches(path):
            return path
        if os.path.isfile(path) and _HF_FILE.match(os.path.basename(path)) and huggingface.matches(
                os.path.dirname(path)):  # a weight file inside a HF directory (MindFormers users pass one)
            return os.path.dirname(path)
        path = _parent(path) or ""
    return None


def resolve_base(given: str | None, checkpoint: str, option: str = "base_model_dir") -> HFBase:
    """The given directory (it must exist), else the one ``checkpoint`` records (``recorded_hf_dir``)."""
    if given:
        if not os.path.isdir(given):
            raise CheckpointError(f"{option}={given} is invalid: it is not a directory. Pass the Hugging Face "
                                  f"directory of the base model (config.json, tokenizer files).")
        return HFBase(os.path.abspath(given), f"given as --{option}")
    found = recorded_hf_dir(checkpoint)
    if found:
        same = os.path.abspath(found) == os.path.abspath(checkpoint)
        return HFBase(found, "the base" if same else f"recorded by {checkpoint}")
    return HFBase(None, f"{checkpoint} records no Hugging Face directory as its origin")


def copy_file(src: str, dst: str) -> None:
    """``src`` -> ``dst`` byte for byte, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def copy_tokenizer_files(base: HFBase, out_dir: str, report: CopyReport) -> None:
    """The tokenizer files and chat template of ``base`` that exist, into ``out_dir``."""
    for name in TOKENIZER_FILES:
        src = os.path.join(base.directory, name) if base.directory else ""
        if src and os.path.isfile(src):
            copy_file(src, os.path.join(out_dir, name))
            report.copied.append(name)
    if not any(name in report.copied for name in _VOCABULARY):
        where = f"{base.directory} has none" if base.directory else base.how
        report.missing.append(f"no tokenizer files ({where}): AutoTokenizer will not load this directory; pass "
                              f"--tokenizer_dir DIR (the base's Hugging Face directory)")


def _model_config(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
    """A config.json as mftune's model_config (its architecture compared by ``recorded_config``)."""
    try:
        return hf_config_to_model_config(hf_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}. Pass the Hugging Face directory of this model's base.") from None


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}). Pass a Hugging Face directory whose "
                              f"config.json transformers wrote.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no JSON object. Pass a Hugging Face directory's config.json.")
    return config


def check_base_config(base: HFBase, derived: dict[str, Any]) -> dict[str, Any]:
    """The base's config.json ({} when it has none), refused when its architecture differs from ``derived``
    (the exported model's own config.json): then it is not this model's base."""
    path = os.path.join(base.directory or "", CONFIG)
    if not base.directory or not os.path.isfile(path):
        return {}
    config = _read_config(path)
    mine = LlamaConfig(**_model_config(derived, "the exported model"))
    wrong = [f"{HF_NAME.get(k, k)}={ours!r} (the exported weights) vs {base!r} ({path})"
             for k, ours, base in mismatches(_model_config(config, path), mine)]
    if wrong:
        raise CheckpointError(f"{base.directory} ({base.how}) is not the base of this model: {'; '.join(wrong)}. "
                              f"Pass the model's own Hugging Face directory with --base_model_dir.")
    return config


def write_config(base: HFBase, out_dir: str, derived: dict[str, Any], dtype: str | None,
                 report: CopyReport) -> None:
    """config.json of ``out_dir``: the base's (checked against ``derived``, the exported model's own
    config.json; its dtype set to ``dtype`` when given and different), else ``derived``."""
    path = os.path.join(base.directory or "", CONFIG)
    target = os.path.join(out_dir, CONFIG)
    if not base.directory or not os.path.isfile(path):
        _write_json(target, derived)
        report.config = "derived from the model config"
        why = f"{base.directory} has no config.json" if base.directory else base.how
        report.missing.append(f"config.json derived from the model config ({why}): model-specific keys (eos lists, "
                              f"rope_scaling details) may differ from the original; pass --base_model_dir DIR")
        return
    config = check_base_config(base, derived)
    updated = dict(config)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if dtype is not None:
        updated.update(dict.fromkeys(keys, dtype))
    if updated == config:
        copy_file(path, target)
        report.config = "copied"
    else:
        _write_json(target, updated)
        report.config = f"copied, {'/'.join(keys)} set to {dtype}"
    report.copied.append(CONFIG)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with atomic_open(path) as f:  # as transformers writes it
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def complete_model_dir(base: HFBase, out_dir: str, derived: dict[str, Any], dtype: str | None) -> CopyReport:
    """config.json, generation_config.json and the tokenizer files of a Hugging Face model directory."""
    report = CopyReport(base)
    write_config(base, out_dir, derived, dtype, report)
    src = os.path.join(base.directory or "", GENERATION_CONFIG)
    if base.directory and os.path.isfile(src):
        copy_file(src, os.path.join(out_dir, GENERATION_CONFIG))
        report.copied.append(GENERATION_CONFIG)
    else:
        report.missing.append("no generation_config.json: transformers derives one from config.json (bos/eos ids "
                              "only; the base's sampling defaults are lost)")
    copy_tokenizer_files(base, out_dir, report)
    _log(report)
    return report


def complete_adapter_dir(base: HFBase, out_dir: str) -> CopyReport:
    """The tokenizer files of a PEFT adapter directory (trainers save the tokenizer beside the adapter)."""
    report = CopyReport(base)
    copy_tokenizer_files(base, out_dir, report)
    _log(report)
    return report


def _log(report: CopyReport) -> None:
    for line in report.missing:
        logger.warning("%s", line)


def summary(report: CopyReport) -> str:
    """One paragraph for a tool's output: where the files came from, which, and what is missing."""
    base = report.base
    head = (f"Copied from {base.directory} ({base.how}): {', '.join(report.copied) or 'nothing'}"
            if base.directory else f"No Hugging Face base directory ({base.how})")
    config = f"; config.json {report.config}" if report.config else ""
    missing = "".join(f"\nMissing: {line}." for line in report.missing)
    return head + config + "." + missing
