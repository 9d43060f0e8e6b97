"""Raw config mapping -> ``MFConfig`` typed by ``mftune.config.schema``, collecting every problem.

Passes, in order: overrides onto the raw mapping (``apply_override``), then types
(``build_config``: unknown keys, wrong types; null means "not set", as in MindFormers). Values,
files and MindFormers' rewrites follow in ``mftune.config.checks``. Each problem is one message
``"<dotted.key>=<value> is invalid: <why>. <fix>"`` (``invalid``); the caller raises them together.
``model.model_config`` stays a mapping (``LlamaConfig(**model_config)`` takes it), typed field by field
against ``LlamaConfig``; its ``pet_config`` is typed and checked by ``mftune.pet.config.pet_config_errors``.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from mftune.config.schema import (
    CALLBACK_ALIASES,
    CALLBACK_KEYS,
    IGNORED_CALLBACK_TYPES,
    CallbackConfig,
    MFConfig,
    ModelConfig,
    RunnerWrapperConfig,
    section_type,
    type_hints,
)
from mftune.models.config import LlamaConfig
from mftune.pet.config import pet_config_errors

logger = logging.getLogger("mftune")

# runner_wrapper.scale_sense as a mapping: MindSpore's DynamicLossScaleUpdateCell and its defaults.
DYNAMIC_LOSS_SCALE = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                      "scale_factor": 2, "scale_window": 1000}

_BAD = object()  # a value that failed conversion (its error is already recorded)
_FREE = "free mapping"  # schema marker: a dict[str, Any] whose keys are not checked
_NoneType = type(None)


# ----------------------------------------------------------------------------- messages

def fmt(value: Any) -> str:
    """A value as it appears in messages: strings quoted, long containers shortened."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def invalid(key: str, value: Any, why: str, fix: str) -> str:
    return f"{key}={fmt(value)} is invalid: {why}. {fix}"


def did_you_mean(word: Any, choices: typing.Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` with the closest choice (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(key: str, value: Any, names: typing.Sequence[str], where: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    hint = did_you_mean(leaf, names)
    if hint:
        fix = "Rename or remove it."
    elif len(names) <= 12:
        fix = f"Remove it; valid keys: {', '.join(names)}."
    else:
        fix = "Remove it; docs/config.md lists every valid key."
    return invalid(key, value, f"{where} has no key {leaf!r}{hint}", fix)


def describe(tp: Any) -> str:
    """'an int', 'a number or null', 'one of train, finetune', ... for a type annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        text = " or ".join(describe(a) for a in args if a is not _NoneType)
        return text + " or null" if _NoneType in args else text
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        item = {int: "ints", float: "numbers", str: "strings", bool: "bools"}.get(args[0], "items")
        return f"a list of {item}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a bool (True or False)", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for tp, name in ((bool, "a bool"), (int, "an int"), (float, "a number"), (str, "a string"),
                     (list, "a list"), (Mapping, "a mapping")):
        if isinstance(value, tp):
            return name
    return type(value).__name__


def _type_error(key: str, value: Any, want: str, errors: list[str]) -> object:
    leaf = key.rsplit(".", 1)[-1]
    errors.append(invalid(key, value, f"expected {want}, got {_kind(value)}", f"Set {leaf} to {want}."))
    return _BAD


# ----------------------------------------------------------------------------- types

def _nullable(tp: Any) -> bool:
    return tp is Any or (get_origin(tp) in (Union, types.UnionType) and _NoneType in get_args(tp))


def convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """``value`` checked against annotation ``tp`` (ints widen to floats, 'true'/'false' to bools).

    Returns the converted value, or ``_BAD`` after recording an error.
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        options = [a for a in args if a is not _NoneType]
        if len(options) == 1:
            return convert(value, options[0], key, errors)
        for option in options:
            trial: list[str] = []
            out = convert(value, option, key, trial)
            if not trial:
                return out
        return _type_error(key, value, describe(tp), errors)
    if origin is Literal:
        if value in args:
            return value
        errors.append(invalid(key, value, f"expected {describe(tp)}{did_you_mean(value, args)}",
                              f"Use one of {', '.join(map(str, args))}."))
        return _BAD
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            return _type_error(key, value, "a mapping", errors)
        return build_section(tp, value, key, errors)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _type_error(key, value, describe(tp), errors)
        items = [convert(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    if origin is dict or tp is dict:
        return dict(value) if isinstance(value, Mapping) else _type_error(key, value, "a mapping", errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    return _type_error(key, value, describe(tp), errors)


def build_section(cls: type, raw: Mapping, prefix: str, errors: list[str]) -> Any:
    """An instance of dataclass ``cls`` from a mapping; bad or unknown keys are recorded and skipped."""
    hints = type_hints(cls)
    names = list(hints)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            errors.append(unknown_key(key, value, names, repr(prefix) if prefix else "the top level"))
            continue
        if value is None and not _nullable(hints[name]):
            continue  # null = not set, as in MindFormers: keep the default
        special = _SPECIAL.get((cls, name))
        out = special(value, key, errors) if special else convert(value, hints[name], key, errors)
        if out is not _BAD:
            kwargs[name] = out
    return cls(**kwargs)


def build_config(raw: Mapping, errors: list[str]) -> MFConfig:
    return build_section(MFConfig, raw, "", errors)


def _model_config(value: Any, key: str, errors: list[str]) -> Any:
    """``model.model_config`` stays a plain dict (for ``LlamaConfig(**model_config)``), typed per field."""
    if not isinstance(value, Mapping):
        return _type_error(key, value, "a mapping", errors)
    hints = type_hints(LlamaConfig)
    out: dict[str, Any] = {}
    for name, v in value.items():
        k = f"{key}.{name}"
        if name not in hints:
            errors.append(unknown_key(k, v, list(hints), repr(key)))
        elif name == "pet_config" and v is not None:
            if isinstance(v, Mapping):
                errors.extend(pet_config_errors(dict(v), k))
                out[name] = dict(v)
            else:
                _type_error(k, v, "a mapping", errors)
        elif v is None and not _nullable(hints[name]):
            continue
        elif (conv := convert(v, hints[name], k, errors)) is not _BAD:
            out[name] = conv
    return out


def _arch(value: Any, key: str, errors: list[str]) -> Any:
    if not isinstance(value, Mapping):
        return _type_error(key, value, "a mapping", errors)
    for name in value:
        if name != "type":
            errors.append(unknown_key(f"{key}.{name}", value[name], ["type"], repr(key)))
    return {"type": value.get("type", "LlamaForCausalLM")}


def _scale_sense(value: Any, key: str, errors: list[str]) -> Any:
    """A static loss scale (number > 0) or a DynamicLossScaleUpdateCell mapping (defaults filled in)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            errors.append(invalid(key, value, "the loss scale must be a finite number > 0",
                                  "Use scale_sense: 1.0 (no scaling)."))
            return _BAD
        return float(value)
    if not isinstance(value, Mapping):
        return _type_error(key, value, "a number or a DynamicLossScaleUpdateCell mapping", errors)
    out = dict(DYNAMIC_LOSS_SCALE)
    n = len(errors)
    for name, v in value.items():
        k = f"{key}.{name}"
        if name not in DYNAMIC_LOSS_SCALE:
            errors.append(unknown_key(k, v, list(DYNAMIC_LOSS_SCALE), repr(key)))
        elif name == "type" and v != "DynamicLossScaleUpdateCell":
            errors.append(invalid(k, v, "the only loss-scale cell is DynamicLossScaleUpdateCell",
                                  "Use type: DynamicLossScaleUpdateCell, or a number for a static scale."))
        elif name == "loss_scale_value" and (_kind(v) not in ("an int", "a number") or not math.isfinite(v) or v <= 0):
            errors.append(invalid(k, v, "expected a number > 0", "Use e.g. loss_scale_value: 65536."))
        elif name == "scale_factor" and (_kind(v) not in ("an int", "a number") or v <= 1):
            errors.append(invalid(k, v, "expected a number > 1", "Use e.g. scale_factor: 2."))
        elif name == "scale_window" and (_kind(v) != "an int" or v < 1):
            errors.append(invalid(k, v, "expected an int >= 1", "Use e.g. scale_window: 1000."))
        else:
            out[name] = v
    return out if len(errors) == n else _BAD


def _callbacks(value: Any, key: str, errors: list[str]) -> Any:
    """``callbacks`` / ``eval_callbacks``: a list of {type: ..., ...}; each type takes its own keys."""
    if not isinstance(value, (list, tuple)):
        return _type_error(key, value, "a list of callback mappings", errors)
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            _type_error(k, item, "a mapping with a 'type' key", errors)
            continue
        item = dict(item)
        ctype = item.get("type")
        if ctype in CALLBACK_ALIASES:
            logger.warning("%s.type=%s is the MindFormers v1.1.0 spelling; read as %s",
                           k, ctype, CALLBACK_ALIASES[ctype])
            ctype = item["type"] = CALLBACK_ALIASES[ctype]
        if ctype in IGNORED_CALLBACK_TYPES:
            out.append(CallbackConfig(type=ctype))
            continue
        if ctype not in CALLBACK_KEYS:
            known = [*CALLBACK_KEYS, *IGNORED_CALLBACK_TYPES]
            errors.append(invalid(f"{k}.type", ctype, f"unknown callback type{did_you_mean(ctype, known)}",
                                  f"Use MFLossMonitor or CheckpointMonitor ({', '.join(IGNORED_CALLBACK_TYPES)} "
                                  f"are accepted and ignored)."))
            continue
        allowed = CALLBACK_KEYS[ctype]
        for name in [n for n in item if n not in allowed]:
            errors.append(unknown_key(f"{k}.{name}", item.pop(name), allowed, f"{ctype} ({k})"))
        out.append(build_section(CallbackConfig, item, k, errors))
    return out


_SPECIAL = {
    (ModelConfig, "model_config"): _model_config,
    (ModelConfig, "arch"): _arch,
    (RunnerWrapperConfig, "scale_sense"): _scale_sense,
    (MFConfig, "callbacks"): _callbacks,
    (MFConfig, "eval_callbacks"): _callbacks,
}


# ----------------------------------------------------------------------------- overrides

def _child_schema(schema: Any, node: Mapping, seg: str) -> Any:
    """What lies under key ``seg`` of a section: a dataclass, ``_FREE``, ``("list", cls)``, a leaf
    annotation, or None when ``seg`` is not a key there."""
    if schema is _FREE:
        return _FREE if seg in node else None
    hints = type_hints(schema)
    if seg not in hints:
        return None
    section = section_type(schema, seg)
    if section is not None:
        return section
    tp = hints[seg]
    options = [a for a in get_args(tp) if a is not _NoneType] if get_origin(tp) in (Union, types.UnionType) else [tp]
    if any(get_origin(option) is dict or option is dict for option in options):
        return _FREE
    return tp


def apply_override(raw: dict, dotted: str, value: Any, errors: list[str]) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted == "a.b.c"``.

    Every intermediate key must be a section of the schema (created when the YAML lacks it), an
    existing key of a free mapping (``context``, ``pet_config``, ...), or a list index
    (``callbacks.1.prefix``). The leaf itself is checked later, with the rest of the config.
    """
    parts = dotted.split(".")
    node: Any = raw
    schema: Any = MFConfig
    for depth, seg in enumerate(parts[:-1]):
        where = ".".join(parts[:depth]) or "the top level"
        if isinstance(node, list):
            if not seg.isdigit() or int(seg) >= len(node) or not isinstance(node[int(seg)], dict):
                errors.append(invalid(dotted, value, f"{seg!r} is not an entry of {where} (it has "
                                      f"{len(node)} entries, numbered from 0)", "Use an existing index."))
                return
            node, schema = node[int(seg)], schema[1]
            continue
        child = _child_schema(schema, node, seg)
        if child is None:
            names = list(node) if schema is _FREE else list(type_hints(schema))
            hint = did_you_mean(seg, names)
            errors.append(invalid(dotted, value, f"{seg!r} is not a key of {where}{hint}",
                                  "Fix the key." if hint else f"Valid keys there: {', '.join(map(str, names))}."))
            return
        is_section = child is _FREE or dataclasses.is_dataclass(child) or isinstance(child, tuple)
        if not is_section or (schema is _FREE and not isinstance(node[seg], dict)):
            errors.append(invalid(dotted, value, f"{'.'.join(parts[:depth + 1])} is a single value, not a section",
                                  f"Set --{'.'.join(parts[:depth + 1])} itself."))
            return
        if not isinstance(node.get(seg), (dict, list)):
            if isinstance(child, tuple):
                errors.append(invalid(dotted, value, f"{'.'.join(parts[:depth + 1])} is not set",
                                      "Define the list in the YAML first."))
                return
            node[seg] = {}
        node, schema = node[seg], child
    leaf = parts[-1]
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            errors.append(invalid(dotted, value, f"{leaf!r} is not an entry of the list", "Use an existing index."))
            return
        node[int(leaf)] = value
    else:
        node[leaf] = value
