"""Raw config mapping -> ``MFConfig``, collecting every problem (used by ``mftune.config.load_config``).

Passes, in order: overrides onto the raw mapping (``apply_override``), types (``build_config``:
unknown keys, wrong types; null means "not set", as in MindFormers), values (``check_values``:
ranges, choices, unsupported layouts), files (``check_files``: paths that must exist), then
MindFormers' rewrites (``finalize``). Each problem is one message
``"<dotted.key>=<value> is invalid: <why>. <fix>"``; the caller raises them together.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import types
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal, Union, get_args, get_origin

from mftune.config import (
    CALLBACK_ALIASES,
    CALLBACK_KEYS,
    IGNORED_CALLBACK_TYPES,
    IGNORED_KEYS,
    CallbackConfig,
    MFConfig,
    ModelConfig,
    RunnerWrapperConfig,
)

logger = logging.getLogger("mftune")

# YAML `type:` values mftune implements, by dotted key (a plain dict to grep, not a registry).
TYPE_CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.type": ("CausalLanguageModelingTrainer",),
    "optimizer.type": ("AdamW", "FP32StateAdamWeightDecay", "AdamWeightDecay"),
    "lr_schedule.type": ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant"),
    "train_dataset.data_loader.type": ("MindDataset",),
    "eval_dataset.data_loader.type": ("MindDataset",),
    "train_dataset_task.type": ("CausalLanguageModelDataset",),
    "eval_dataset_task.type": ("CausalLanguageModelDataset",),
    "runner_wrapper.type": ("MFTrainOneStepCell",),
    "model.model_config.type": ("LlamaConfig",),
    "model.arch.type": ("LlamaForCausalLM",),
    "processor.type": ("LlamaProcessor",),
    "processor.tokenizer.type": ("LlamaTokenizer",),
}

DTYPE_NAMES = ("float16", "bfloat16", "float32")
DTYPE_KEYS = ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type",
              "rotary_dtype")
EXTEND_METHODS = ("None", "PI", "NTK")  # any case, as the model reads them

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

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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
    hints = _hints(cls)
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
    from mftune.models.llama import LlamaConfig
    from mftune.pet.config import pet_config_errors

    if not isinstance(value, Mapping):
        return _type_error(key, value, "a mapping", errors)
    hints = _hints(LlamaConfig)
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
        if value <= 0:
            errors.append(invalid(key, value, "the loss scale must be > 0", "Use scale_sense: 1.0 (no scaling)."))
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
        elif name == "loss_scale_value" and (_kind(v) not in ("an int", "a number") or v <= 0):
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
    from mftune.models.llama import LlamaConfig

    if schema is _FREE:
        return _FREE if seg in node else None
    hints = _hints(schema)
    if seg not in hints:
        return None
    if (schema, seg) == (ModelConfig, "model_config"):
        return LlamaConfig
    if (schema, seg) == (LlamaConfig, "pet_config"):
        return _FREE
    tp = hints[seg]
    options = [a for a in get_args(tp) if a is not _NoneType] if get_origin(tp) in (Union, types.UnionType) else [tp]
    for option in options:
        if dataclasses.is_dataclass(option):
            return option
        if get_origin(option) is list and dataclasses.is_dataclass(get_args(option)[0]):
            return ("list", get_args(option)[0])
        if get_origin(option) is dict or option is dict:
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
            names = list(node) if schema is _FREE else list(_hints(schema))
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


# ----------------------------------------------------------------------------- ignored keys

def _leaves(node: Any, path: tuple = ()) -> typing.Iterator[tuple]:
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and all(isinstance(v, Mapping) for v in node):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _display(path: tuple) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def compact(keys: list[str]) -> str:
    """``a.x, a.y, b`` -> ``a.{x, y}, b`` (siblings grouped under their parent, first-seen order)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, dot, leaf = key.rpartition(".")
        groups.setdefault(parent if dot else key, []).append(leaf if dot else "")
    out = []
    for parent, leaves in groups.items():
        if leaves == [""]:
            out.append(parent)
        else:
            out.append(f"{parent}.{leaves[0]}" if len(leaves) == 1 else f"{parent}.{{{', '.join(leaves)}}}")
    return ", ".join(out)


def ignored_keys_present(raw: Mapping) -> list[str]:
    """The keys of ``raw`` that IGNORED_KEYS covers, plus ignored callbacks, in YAML order."""
    patterns = [p.split(".") for p in IGNORED_KEYS]
    found = []
    for path in _leaves(raw):
        if any(len(p) <= len(path) and all(fnmatchcase(str(s), q) for s, q in zip(path, p)) for p in patterns):
            found.append(_display(path))
    for list_key in ("callbacks", "eval_callbacks"):
        entries = raw.get(list_key)
        for i, item in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(item, Mapping) and item.get("type") in IGNORED_CALLBACK_TYPES:
                found.append(f"{list_key}[{i}] ({item['type']})")
    return found


# ----------------------------------------------------------------------------- values

def _get(cfg: Any, dotted: str) -> Any:
    """The value at ``a.b[1].c`` of a config (dataclasses, dicts, lists), None when absent."""
    for seg in dotted.split("."):
        name, _, index = seg.partition("[")
        cfg = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if index and isinstance(cfg, list):
            cfg = cfg[int(index.rstrip("]"))]
        if cfg is None:
            return None
    return cfg


class _Checker:
    """Collects ``invalid`` messages for rules on values read by dotted key."""

    def __init__(self, cfg: MFConfig, errors: list[str]):
        self.cfg, self.errors = cfg, errors

    def rule(self, key: str, ok: typing.Callable[[Any], bool], why: str, fix: str) -> None:
        value = _get(self.cfg, key)
        if value is not None and not ok(value):
            self.errors.append(invalid(key, value, why, fix))

    def at_least(self, key: str, low: int, fix: str) -> None:
        self.rule(key, lambda v: v >= low, f"must be >= {low}", fix)

    def choice(self, key: str, choices: typing.Sequence[str]) -> None:
        hint = f"Use one of {', '.join(choices)}." if len(choices) > 1 else f"Use {choices[0]}."
        value = _get(self.cfg, key)
        if value is not None and value not in choices:
            self.errors.append(invalid(key, value, f"not a type mftune implements{did_you_mean(value, choices)}",
                                       hint))


def check_values(cfg: MFConfig, errors: list[str]) -> None:
    """Ranges, choices and unsupported layouts, each reported with its key and a fix."""
    c = _Checker(cfg, errors)
    for key, choices in TYPE_CHOICES.items():
        c.choice(key, choices)
    _check_training(c)
    _check_parallel(c, cfg)
    for list_key in ("callbacks", "eval_callbacks"):
        for i, cb in enumerate(getattr(cfg, list_key)):
            if cb.type in CALLBACK_KEYS:
                k = f"{list_key}[{i}]"
                c.rule(f"{k}.per_print_times", lambda v: v >= 1, "must be >= 1", "Use per_print_times: 1 to log every step.")
                c.rule(f"{k}.save_checkpoint_steps", lambda v: v >= 1, "must be >= 1",
                       "Use e.g. save_checkpoint_steps: 100.")
                c.rule(f"{k}.keep_checkpoint_max", lambda v: v >= 1, "must be >= 1",
                       "Use e.g. keep_checkpoint_max: 5.")
    _check_model(c, cfg.model.model_config)


def _check_training(c: _Checker) -> None:
    c.at_least("runner_config.epochs", 1, "Use e.g. --epochs 1.")
    c.at_least("runner_config.batch_size", 1, "Use e.g. --batch_size 1 (sequences per data-parallel rank and micro-step).")
    c.at_least("runner_config.gradient_accumulation_steps", 1, "Use 1 for no accumulation.")
    c.rule("runner_config.sink_size", lambda v: v == -1 or v >= 1, "must be -1 or >= 1", "Use sink_size: -1.")
    for ds in ("train_dataset", "eval_dataset"):
        c.at_least(f"{ds}.batch_size", 1, "Use e.g. batch_size: 1.")
        c.at_least(f"{ds}.data_loader.num_samples", 1, "Remove it to use every record.")
    in_01 = (lambda v: 0 <= v < 1)
    c.rule("optimizer.learning_rate", lambda v: v >= 0, "must be >= 0", "Use e.g. learning_rate: 1.e-5.")
    c.rule("optimizer.eps", lambda v: v > 0, "must be > 0", "Use eps: 1.e-8.")
    c.rule("optimizer.beta1", in_01, "must be in [0, 1)", "Use beta1: 0.9.")
    c.rule("optimizer.beta2", in_01, "must be in [0, 1)", "Use beta2: 0.999 (or 0.95).")
    c.rule("optimizer.betas", lambda v: len(v) == 2 and all(in_01(b) for b in v),
           "must be two numbers in [0, 1)", "Use betas: [0.9, 0.999], or beta1/beta2.")
    c.rule("optimizer.weight_decay", lambda v: v >= 0, "must be >= 0", "Use weight_decay: 0.0.")
    c.rule("lr_schedule.learning_rate", lambda v: v >= 0, "must be >= 0", "Use e.g. learning_rate: 1.e-5.")
    c.rule("lr_schedule.lr_end", lambda v: v >= 0, "must be >= 0", "Use lr_end: 0.")
    c.rule("lr_schedule.warmup_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]", "Use e.g. warmup_ratio: 0.03.")
    c.rule("lr_schedule.warmup_steps", lambda v: v >= 0, "must be >= 0", "Use warmup_steps: 0.")
    c.rule("lr_schedule.warmup_lr_init", lambda v: v >= 0, "must be >= 0", "Use warmup_lr_init: 0.")
    c.rule("lr_schedule.total_steps", lambda v: v == -1 or v >= 1, "must be -1 or >= 1",
           "Use total_steps: -1 (epochs x steps per epoch).")
    c.rule("lr_schedule.num_cycles", lambda v: v > 0, "must be > 0", "Use num_cycles: 0.5.")
    c.rule("runner_wrapper.max_grad_norm", lambda v: v > 0, "must be > 0",
           "Use e.g. max_grad_norm: 1.0, or use_clip_grad: False to disable clipping.")
    c.rule("predict_batch_size", lambda v: v >= 1, "must be >= 1", "Use e.g. --predict_batch_size 1.")
    c.rule("transform_process_num", lambda v: v >= 1, "must be >= 1", "Use transform_process_num: 1.")
    for key in ("eval_step_interval", "eval_epoch_interval"):
        c.rule(key, lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1", f"Use e.g. {key}: -1.")


def _check_parallel(c: _Checker, cfg: MFConfig) -> None:
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "context_parallel"):
        c.at_least(f"parallel_config.{key}", 1, f"Use e.g. {key}: 1.")
    if cfg.use_parallel:
        c.rule("parallel_config.pipeline_stage", lambda v: v <= 1, "pipeline parallelism is not supported yet",
               "Use pipeline_stage: 1 (with data_parallel x model_parallel = number of processes).")
    c.rule("parallel_config.context_parallel", lambda v: v <= 1, "context parallelism is not supported yet",
           "Use context_parallel: 1.")
    c.rule("micro_batch_interleave_num", lambda v: v == 1, "micro-batch interleaving is not supported yet",
           "Use micro_batch_interleave_num: 1.")


def _check_model(c: _Checker, model_config: dict[str, Any]) -> None:
    """Ranges of ``model.model_config``; keys it lacks take LlamaConfig's defaults."""
    from mftune.models.llama import LlamaConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
    m = {**defaults, **model_config}
    if m["n_kv_heads"] is None:
        m["n_kv_heads"] = m["num_heads"]
    key = "model.model_config"

    def bad(name: str, why: str, fix: str) -> None:
        c.errors.append(invalid(f"{key}.{name}", m[name], why, fix))

    for name, fix in (("seq_length", "Use e.g. seq_length: 4096 (records hold seq_length + 1 tokens)."),
                      ("vocab_size", "Use the tokenizer's size, e.g. vocab_size: 32000."),
                      ("num_layers", "Use e.g. num_layers: 32."), ("num_heads", "Use e.g. num_heads: 32."),
                      ("hidden_size", "Use e.g. hidden_size: 4096."), ("n_kv_heads", "Use e.g. n_kv_heads: 8.")):
        if isinstance(m[name], int) and m[name] <= 0:
            bad(name, "must be > 0", fix)
    if isinstance(m["rms_norm_eps"], (int, float)) and m["rms_norm_eps"] <= 0:
        bad("rms_norm_eps", "must be > 0", "Use rms_norm_eps: 1.0e-5.")
    heads, kv, hidden = m["num_heads"], m["n_kv_heads"], m["hidden_size"]
    if all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden)):
        if hidden % heads:
            bad("hidden_size", f"it is not divisible by num_heads={heads}",
                f"Use a multiple of num_heads (e.g. {heads * max(1, hidden // heads)}), or change num_heads.")
        if heads % kv:
            bad("num_heads", f"it is not divisible by n_kv_heads={kv} (grouped-query attention)",
                "Use n_kv_heads dividing num_heads (n_kv_heads = num_heads disables GQA).")
    for name in DTYPE_KEYS:
        if isinstance(m[name], str) and m[name] not in DTYPE_NAMES:
            bad(name, f"unknown dtype{did_you_mean(m[name], DTYPE_NAMES)}", "Use float16, bfloat16 or float32.")
    method = m["extend_method"]
    if isinstance(method, str) and method.upper() not in (m.upper() for m in EXTEND_METHODS):
        bad("extend_method", "unknown RoPE extension", "Use None, PI or NTK.")


# ----------------------------------------------------------------------------- files

def check_files(cfg: MFConfig, errors: list[str]) -> None:
    """Paths that must exist for this run (relative paths are relative to the working directory)."""
    def must_exist(key: str, flag: str, what: str) -> None:
        path = _get(cfg, key)
        if path and not os.path.exists(path):
            errors.append(invalid(key, path, "no such file or directory", f"Pass {what} with {flag}."))

    must_exist("load_checkpoint", "--load_checkpoint",
               "an existing checkpoint (safetensors file, Hugging Face directory or checkpoint directory)")
    must_exist("src_strategy_path_or_dir", "--src_strategy_path_or_dir", "an existing strategy file or directory")
    must_exist("processor.tokenizer.vocab_file", "--processor.tokenizer.vocab_file",
               "the tokenizer's sentencepiece model (tokenizer.model)")
    needs = []
    if cfg.run_mode in ("train", "finetune"):
        needs.append(("train", "train_dataset"))
        if cfg.do_eval:
            needs.append(("eval", "eval_dataset"))
    elif cfg.run_mode == "eval":
        needs.append(("eval", "eval_dataset"))
    for flag, section in needs:
        key = f"{section}.data_loader.dataset_dir"
        if not _get(cfg, key):
            purpose = "evaluation" if flag == "eval" else f"run_mode {cfg.run_mode}"
            errors.append(invalid(key, "", f"{purpose} needs a dataset",
                                  f"Pass --{flag}_dataset_dir DIR (a directory written by scripts/llama_preprocess.py)."))
        else:
            must_exist(key, f"--{flag}_dataset_dir", "a directory written by scripts/llama_preprocess.py")


# ----------------------------------------------------------------------------- MindFormers' rewrites

def finalize(cfg: MFConfig) -> None:
    """What MindFormers does to a config after loading (reference/mindformers.md §1.5)."""
    cfg.train_dataset.batch_size = cfg.runner_config.batch_size  # runner_config wins
    cfg.train_dataset.seed = cfg.eval_dataset.seed = cfg.seed  # the global seed drives the data
    cfg.train_dataset_task.dataset_config = cfg.train_dataset  # the task reads the dataset block
    cfg.eval_dataset_task.dataset_config = cfg.eval_dataset
    pc = cfg.parallel_config
    layout = (pc.data_parallel, pc.model_parallel, pc.pipeline_stage, pc.context_parallel)
    if not cfg.use_parallel and layout != (1, 1, 1, 1):
        logger.info("use_parallel is False: parallel_config (data_parallel=%d, model_parallel=%d, "
                    "pipeline_stage=%d, context_parallel=%d) is treated as all 1 (one process)", *layout)
        pc.data_parallel = pc.model_parallel = pc.pipeline_stage = pc.context_parallel = 1
