"""Loading a configuration: YAML (+ ``base_config`` files) and overrides -> a validated ``MFConfig``.

``load_config(path, overrides)`` reads the YAML with OmegaConf (anchors, ``1e-5`` floats), merges
its ``base_config`` files under it, applies dotted overrides, then ``mftune.config.coerce`` turns the
raw mapping into an ``MFConfig`` and ``mftune.config.checks`` checks its values, collecting every
problem into one ``ConfigError``. OmegaConf's structured merge is not used for the schema: it stops
at the first error and cannot type ``float | dict`` (``runner_wrapper.scale_sense``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import yaml
from omegaconf import OmegaConf

from mftune.config import checks
from mftune.config.coerce import apply_override, build_config
from mftune.config.schema import CALLBACK_KEYS, MFConfig
from mftune.errors import ConfigError
from mftune.fileio import atomic_open

logger = logging.getLogger("mftune")


def load_config(path: str, overrides: dict[str, Any] | None = None, *,
                check_files: bool = True) -> MFConfig:
    """Read ``path`` (and its ``base_config`` files), apply ``overrides``, validate, return the config.

    ``overrides`` maps dotted keys (``"runner_config.epochs"``, ``"callbacks.1.prefix"``) to
    values and is applied in insertion order on top of the YAML (``mftune.config.cli`` builds it in
    MindFormers' precedence order). Every intermediate key must exist in the schema.
    ``check_files=False`` skips the existence checks (``load_checkpoint``, dataset directories,
    ``vocab_file``), e.g. to validate a shipped YAML without data. Missing keys, and keys set to
    null, take the dataclass defaults. Raises ConfigError listing every problem found.
    """
    raw = read_yaml(path)
    errors: list[str] = []
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value, errors)
    ignored = checks.ignored_keys_present(raw)
    cfg = build_config(raw, errors)
    checks.check_values(cfg, errors)
    if check_files:
        checks.check_files(cfg, errors)
    if errors:
        raise ConfigError(errors, path)
    checks.finalize(cfg)
    if ignored:
        log_ignored(ignored)
    return cfg


def log_ignored(ignored: list[str]) -> None:
    """One short INFO line (how many keys, a pointer to the docs), the keys themselves at DEBUG;
    ``python -m mftune.cli --config FILE`` prints them all (MindSpore/Ascend settings, keys MindFormers'
    trainer fills itself)."""
    logger.info("Ignored on this backend (no effect): %d accepted setting(s), e.g. %s; see "
                "docs/config.md#ignored-keys (python -m mftune.cli --config FILE lists them)",
                len(ignored), ", ".join(ignored[:2]))
    logger.debug("Ignored keys: %s", checks.compact(ignored))


def read_yaml(path: str) -> dict[str, Any]:
    """The YAML at ``path`` as a plain dict, its ``base_config`` files merged underneath.

    ``base_config`` is a path or a list of paths relative to the file that names it; bases are
    merged in order, then the file itself on top, recursively (mappings merge key by key, any
    other value replaces). A file that (indirectly) includes itself is an error.
    """
    return _read_yaml(path, ())


def _read_yaml(path: str, stack: tuple[str, ...]) -> dict[str, Any]:
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join([*stack, real])
        raise ConfigError([f"base_config={path!r} is invalid: it includes itself ({chain}). "
                           f"Remove the cycle from the base_config chain."], stack[0])
    if not os.path.isfile(path):
        key = "base_config" if stack else "config"
        raise ConfigError([f"{key}={path!r} is invalid: no such file. "
                           f"Pass the path of an existing YAML file."], stack[0] if stack else path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # YAML syntax, duplicate keys, bad interpolation: all user errors
        why = " ".join(str(exc).split())
        raise ConfigError([f"config={path!r} is invalid: it could not be read ({why}). "
                           f"Fix the YAML syntax."], path) from None
    if not data:
        raise ConfigError([f"config={path!r} is invalid: the file is empty. Start from "
                           f"configs/llama2/lora_llama2_7b.yaml (or use base_config: it)."], path)
    if not isinstance(data, dict):
        raise ConfigError([f"config={path!r} is invalid: the top level is not a mapping. "
                           f"Write one 'key: value' per line."], path)
    bases = data.pop("base_config", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([f"base_config={bases!r} is invalid: expected a path or a list of paths. "
                           f"Write e.g. base_config: ../base.yaml"], path)
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = merge_dicts(merged, _read_yaml(base_path, (*stack, real)))
    return merge_dicts(merged, data)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge recursively, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: MFConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``save_config`` writes; ``load_config`` reads it back).

    Each callback keeps only the keys of its type (CALLBACK_KEYS; just ``type`` for ignored ones).
    """
    out = dataclasses.asdict(cfg)
    for list_key in ("callbacks", "eval_callbacks"):
        out[list_key] = [{k: v for k, v in cb.items() if k in CALLBACK_KEYS.get(cb["type"], ("type",))}
                         for cb in out[list_key]]
    return out


def save_config(cfg: MFConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: a temporary file renamed into place)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("# Resolved mftune configuration (YAML + command line). Reload it with --config.\n")
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)
