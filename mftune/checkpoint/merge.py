"""Merge LoRA adapters into their base weights (MindFormers' ``mindformers/tools/transform_ckpt_lora.py``).

For every adapted Linear ``W`` with adapters ``A [r, in]``, ``B [out, r]``:
``W' = (W.float() + B.float() @ A.float() * scaling).to(W.dtype)`` (``mftune.pet.lora_delta_weight``); with
a DoRA magnitude ``m``, ``W' = m / ||W + dW|| * (W + dW)`` per output row (``mftune.pet.dora.merged_weight``).
Every other model tensor is copied as is; LoRA tensors, optimizer moments (``adam_m.*``, ``adam_v.*``)
and counters are dropped. The result is a plain model: a complete mftune file whose header holds the
model_config without ``pet_config`` (``load_checkpoint`` and ``convert_weight.py --reversed`` read it),
a Hugging Face directory (through ``convert.convert_mftune_to_hf``), or a MindSpore ``merged_lora.ckpt``
(what MindFormers' tool writes; MindFormers' names).

Invariants:
- Sources are whatever ``formats.open_checkpoint`` reads: the LoRA side may be a complete LoRA file,
  a distributed ``rank_*/`` directory, a PEFT adapter directory or MindSpore ``.ckpt`` checkpoints (a
  rank set with its ``src_strategy``); the base is the checkpoint the LoRA header records (its
  fingerprint checked) unless one is given.
- The model config comes from the given ``model_config`` (a YAML's), the LoRA header or the base's.
  A MindSpore checkpoint records none: without one, every weight present is merged or copied as
  MindFormers' tool does, checked only for fitting its adapters (not for the model's full set).
- Model tensors held by the LoRA source (e.g. norms unfrozen with ``freeze_exclude``, or a network
  checkpoint holding base + LoRA) override the base's: they are the trained values.
- Everything is checked before a byte is written: adapter pairs, base weights, shapes, the scaling.
- Streaming: the output header comes from shapes and dtypes (a one-element read each), then the
  tensors are read, merged and written one at a time (peak memory ~ one tensor). Outputs are atomic
  and never replace an input.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mftune.checkpoint.convert import convert_mftune_to_hf
from mftune.checkpoint.entries import Entry
from mftune.checkpoint.formats import checkpoint_header, open_checkpoint
from mftune.checkpoint.hf_files import CopyReport, HFBase, check_base_config, resolve_base
from mftune.checkpoint.keys import (LORA_A, LORA_B, LORA_M, LORA_MARK, is_init_factor, is_lora, is_prefix_param,
                                   is_training_state)
from mftune.checkpoint.load import fingerprint
from mftune.checkpoint.mindspore.ckpt import write_ckpt_streaming
from mftune.checkpoint.model_weights import check_weights, expected_weights
from mftune.checkpoint.names import model_config_to_hf_config
from mftune.checkpoint.safetensors_io import encode_metadata, write_safetensors_streaming
from mftune.errors import CheckpointError
from mftune.fileio import check_free_space, specs_bytes
from mftune.log import Progress, with_progress
from mftune.pet.config import init_method, is_base_init
from mftune.pet.config import lora_scaling as pet_scaling
from mftune.pet.init import held_dtype, initial_factors
from mftune.pet.dora import merged_weight
from mftune.pet.lora import lora_delta_weight

logger = logging.getLogger("mftune")

MERGED_NAME = "merged_lora.safetensors"  # MindFormers writes dst/merged_lora.ckpt
MERGED_CKPT = "merged_lora.ckpt"
SUFFIX_A, SUFFIX_B, SUFFIX_M = f".{LORA_A}", f".{LORA_B}", f".{LORA_M}"
FORMATS = ("mftune", "hf", "ckpt", "mindspore")  # mindspore: another name of ckpt


def _pairs(lora: dict[str, Entry], where: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(``{base weight name: (A name, B name)}``, ``{base weight name: DoRA magnitude name}``); an adapter without
    its partner is an error naming it."""
    halves: dict[str, dict[str, str]] = {}
    magnitudes: dict[str, str] = {}
    odd = []
    for name in lora:
        if name.endswith(SUFFIX_M):
            magnitudes[name[:-len(SUFFIX_M)] + ".weight"] = name
            continue
        for suffix, side in ((SUFFIX_A, "a"), (SUFFIX_B, "b")):
            if name.endswith(suffix):
                halves.setdefault(name[:-len(suffix)] + ".weight", {})[side] = name
                break
        else:
            odd.append(name)
    if odd:
        raise CheckpointError(f"{where}: LoRA tensor(s) {', '.join(odd)} are not *{SUFFIX_A} / *{SUFFIX_B}. "
                              f"Merge a checkpoint saved by mftune's LoRA (or a PEFT adapter).")
    unpaired = [f"{sides.get('a') or sides.get('b')} has no {SUFFIX_B if 'a' in sides else SUFFIX_A}"
                for sides in halves.values() if len(sides) != 2]
    if unpaired:
        raise CheckpointError(f"{where}: incomplete LoRA adapter pair(s): {'; '.join(unpaired)}. The checkpoint "
                              f"is damaged or was edited; use a complete save.")
    alone = sorted(set(magnitudes) - set(halves))
    if alone:
        raise CheckpointError(f"{where}: DoRA magnitude {magnitudes[alone[0]]} has no LoRA pair. The checkpoint is "
                              f"damaged or was edited; use a complete save.")
    plain = sorted(set(halves) - set(magnitudes))
    if magnitudes and plain:
        raise CheckpointError(f"{where}: DoRA magnitudes for some adapted weights but none for {plain[0]} (and "
                              f"{len(plain) - 1} more). The checkpoint is damaged or was edited; use a complete save.")
    return {w: (s["a"], s["b"]) for w, s in halves.items()}, magnitudes


def _scaling(pet_config: dict | None, lora_scaling: float | None, ranks: set[int], where: str) -> float:
    if lora_scaling is not None:
        if not math.isfinite(lora_scaling):  # every merged weight would be NaN or Inf
            raise CheckpointError(f"lora_scaling={lora_scaling} is invalid: not a finite number. Pass "
                                  f"lora_alpha / lora_rank (e.g. --lora_scaling 2), or leave it out to use {where}'s.")
        return float(lora_scaling)
    pc = pet_config or {}
    if pc.get("lora_alpha") is None or not pc.get("lora_rank"):
        raise CheckpointError(f"{where} records no pet_config with lora_alpha and lora_rank, so the LoRA scaling "
                              f"is unknown. Pass --lora_scaling <lora_alpha / lora_rank>.")
    if ranks and ranks != {int(pc["lora_rank"])}:
        raise CheckpointError(f"{where}: pet_config lora_rank={pc['lora_rank']} but the adapters have rank(s) "
                              f"{sorted(ranks)}. Pass --lora_scaling <lora_alpha / rank> explicitly "
                              f"(lora_alpha / sqrt(rank) for rsLoRA).")
    return pet_scaling(float(pc["lora_alpha"]), int(pc["lora_rank"]), bool(pc.get("use_rslora")))


def _inputs(path: str) -> tuple[set[str], set[str]]:
    """(real paths of the files, real paths of the directories) an input consists of."""
    real = os.path.realpath(path)
    if os.path.isfile(real):
        return {real}, set()
    files = {os.path.realpath(os.path.join(d, f)) for d, _, names in os.walk(real) for f in names}
    return files, {real}


def merge_lora_checkpoint(lora_path: str, dst_dir: str, *, base_path: str | None = None,
                          lora_scaling: float | None = None, ignore_fingerprint: bool = False,
                          output_format: str = "mftune", progress: Progress | None = None,
                          model_config: dict[str, Any] | None = None, src_strategy: str = "",
                          base_model_dir: str | None = None) -> dict[str, Any]:
    """Merge the LoRA checkpoint ``lora_path`` into its base and write a plain model to ``dst_dir``:
    ``dst_dir/merged_lora.safetensors`` (``output_format="mftune"``), a HF directory ``dst_dir``
    (``"hf"``) or ``dst_dir/merged_lora.ckpt`` (``"ckpt"``). ``base_path`` default: the base recorded
    in the LoRA header, whose fingerprint must match (unless ``ignore_fingerprint``). ``lora_scaling``
    default: pet_config lora_alpha / lora_rank (``/ sqrt(lora_rank)`` with use_rslora). ``model_config``: when
    the checkpoints record none (MindSpore's); ``src_strategy``: the strategy of a distributed MindSpore source.
    ``base_model_dir`` (``"hf"`` only): the Hugging Face directory whose config.json, generation_config.json and
    tokenizer files complete the output; default: the one the base (or the LoRA source) records as its origin.
    Returns a report: output, merged, copied, dropped, scaling, base, hf_files (``"hf"``: what was copied)."""
    start = time.perf_counter()
    if output_format not in FORMATS:
        raise CheckpointError(f"output_format={output_format} is invalid: use one of {', '.join(FORMATS)}.")
    if not os.path.exists(lora_path):
        raise CheckpointError(f"checkpoint {lora_path} does not exist. Give a checkpoint file or directory.")
    header = checkpoint_header(lora_path)
    source = open_checkpoint(lora_path, src_strategy)
    base_path, base = _open_base(lora_path, header, base_path, ignore_fingerprint)
    mc, pet_config = _model_config(model_config, header, base_path, lora_path, output_format)
    cfg, expected = expected_weights(mc, lora_path) if mc else (None, None)
    parts = _sort_tensors(source, base, base_path, lora_path, expected, bool(cfg and cfg.tie_word_embeddings))
    expected = expected or {n: e.shape for n, e in parts.model.items()}
    pairs, magnitudes = _pairs(parts.lora, lora_path)
    _check_fit(pairs, parts.model, parts.lora, lora_path, magnitudes)
    scaling = _scaling(pet_config, lora_scaling, {parts.lora[a].shape[0] for a, _ in pairs.values()}, lora_path)
    target = _destination(dst_dir, output_format, lora_path, base_path)
    hf_base = _hf_base(base_model_dir, base_path, lora_path, mc) if output_format == "hf" else None

    names = list(expected)  # model order
    specs = [(n, parts.model[n].dtype, expected[n]) for n in names]
    init = init_method((pet_config or {}).get("init_lora_weights", True))  # PiSSA / OLoRA: minus s B0 A0 of W

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name in with_progress(progress, names, len(specs)):  # the bar holds names, not tensors
            w = parts.model[name].full()
            if name in pairs:
                a, b = pairs[name]
                delta = lora_delta_weight(parts.lora[a].full(), parts.lora[b].full(), scaling)
                if is_base_init(init):  # W as the run held it (param_init_type)
                    a0, b0 = initial_factors(w, parts.lora[a].shape[0], scaling, init, held_dtype(mc))
                    delta = delta - lora_delta_weight(a0, b0, scaling)
                merged = (merged_weight(w, parts.lora[magnitudes[name]].full(), delta)[0] if name in magnitudes
                          else w.float() + delta)  # DoRA: m / ||W + dW|| * (W + dW)
                w = merged.to(w.dtype)
            yield name, w
            del w  # before the next one is read

    info = {"format": "lora_merge", "lora": os.path.abspath(lora_path),
            "base": os.path.abspath(base_path) if base_path else None, "lora_scaling": scaling,
            "merged": sorted(pairs)}
    metadata = encode_metadata({"model_config": mc, "source": info})
    output, hf_files = _write(target, output_format, specs, stream(), metadata, hf_base)
    return {"output": output, "merged": len(pairs), "copied": len(names) - len(pairs),
            "overridden": sorted(parts.overridden), "dropped": len(parts.dropped) + 2 * len(pairs) + len(magnitudes),
            "scaling": scaling, "base": base_path, "hf_files": hf_files, "seconds": time.perf_counter() - start}


def _hf_base(given: str | None, base_path: str | None, lora_path: str, mc: dict[str, Any]) -> HFBase:
    """The Hugging Face directory completing a ``"hf"`` output: the given one, else the base's recorded
    origin, else the LoRA source's (a PEFT adapter's base_model_name_or_path); checked against ``mc``."""
    base = resolve_base(given, base_path or lora_path)
    if base.directory is None and base_path:
        base = resolve_base(None, lora_path)
    try:
        check_base_config(base, model_config_to_hf_config(mc))
    except ValueError as exc:
        raise CheckpointError(f"{lora_path}: {exc}") from None
    return base


def _model_config(given: dict[str, Any] | None, header: dict, base_path: str | None, lora_path: str,
                  output_format: str) -> tuple[dict[str, Any], dict | None]:
    """(the model config without pet_config, the pet_config): the given one, else the LoRA header's, else
    the base's. None is known only for MindSpore checkpoints: a .ckpt output is then written anyway."""
    base_header = checkpoint_header(base_path) if base_path else {}
    mc = dict(given or header.get("model_config") or base_header.get("model_config") or {})
    pet_config = mc.pop("pet_config", None) or header.get("pet_config")
    if not mc and output_format not in ("ckpt", "mindspore"):
        raise CheckpointError(f"neither {lora_path} nor {base_path or 'a base checkpoint'} records a model_config. "
                              f"Pass --config with the model's YAML, or --base_checkpoint with a complete mftune "
                              f"file or a Hugging Face directory.")
    if not mc:
        logger.warning("No model config is known for %s: every LoRA pair is merged into the weight it adapts and "
                       "every other weight copied, as MindFormers' tool does (pass --config to check the weights "
                       "against the model)", lora_path)
    return mc, pet_config


def _open_base(lora_path: str, header: dict, base_path: str | None,
               ignore_fingerprint: bool) -> tuple[str | None, dict[str, Entry]]:
    """(the base's path, its tensors): the given one, else the one the LoRA header records (its
    fingerprint checked unless ``ignore_fingerprint``); (None, {}) when there is neither."""
    recorded = header.get("base_checkpoint") or {}
    base_path = base_path or recorded.get("path") or None
    if not base_path:
        return None, {}
    if not os.path.exists(base_path):
        given = "recorded in " + lora_path if base_path == recorded.get("path") else "given"
        raise CheckpointError(f"base checkpoint {base_path} ({given}) does not exist. Pass the base the LoRA "
                              f"was trained on with --base_checkpoint PATH.")
    want = recorded.get("fingerprint")
    got = fingerprint(base_path, like=want) if want and not ignore_fingerprint else want
    if got != want:
        raise CheckpointError(f"base checkpoint {base_path} has fingerprint {got} but "
                              f"{lora_path} was trained on {recorded.get('path')} with fingerprint {want}. Pass "
                              f"the original base with --base_checkpoint, or --ignore_fingerprint if you are sure.")
    return base_path, open_checkpoint(base_path)


@dataclass
class _Parts:
    lora: dict[str, Entry]  # the adapters
    model: dict[str, Entry]  # the weights of the merged model (LoRA source over the base)
    dropped: list[str]  # optimizer moments, counters, a tied lm_head
    overridden: list[str]  # base weights the LoRA source holds trained values of


def _sort_tensors(source: dict[str, Entry], base: dict[str, Entry], base_path: str | None, lora_path: str,
                  expected: dict[str, tuple[int, ...]] | None, tie: bool) -> _Parts:
    """Adapters, model tensors (the LoRA source overrides the base), dropped; every weight checked
    (``expected`` None: no model config, every tensor that is not an adapter is a weight)."""
    def dropped_kind(name: str) -> bool:  # optimizer moments (of adapters too), counters, a tied lm_head
        return is_training_state(name) or (tie and name == "lm_head.weight") or is_init_factor(name)

    parts = _Parts({n: e for n, e in source.items() if is_lora(n) and not dropped_kind(n)}, {}, [], [])
    prefix = next((n for n in source if is_prefix_param(n)), None)
    if prefix is not None:  # prefix tuning / P-tuning v2 (mftune.pet.prefix)
        raise CheckpointError(f"{lora_path} holds a prefix ({prefix}): prefix tuning and P-tuning v2 have nothing to "
                              f"merge, their prefix is extra keys/values in every layer's attention, not a change of "
                              f"the weights. Apply the checkpoint with its pet_config as load_checkpoint, or export it "
                              f"with scripts/export_adapter.py (a PEFT PREFIX_TUNING adapter).")
    if not parts.lora:
        raise CheckpointError(f"{lora_path} holds no LoRA tensors (*{LORA_MARK}*). Pass the LoRA checkpoint as "
                              f"--src_ckpt_path_or_dir.")
    unknown = []
    for entries, is_source in ((base, False), (source, True)):
        for name, entry in entries.items():
            if dropped_kind(name):
                parts.dropped.append(name)
            elif is_lora(name):
                if not is_source:
                    raise CheckpointError(f"base checkpoint {base_path} holds LoRA tensor {name}. Pass a base "
                                          f"without adapters as --base_checkpoint.")
            elif expected is not None and name not in expected:
                unknown.append(f"{name} ({entry.origin})")
            else:
                if is_source and name in parts.model:
                    parts.overridden.append(name)
                parts.model[name] = entry
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor(s) are not weights of the model_config's Llama: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Check the base "
                              f"checkpoint and the LoRA checkpoint belong together.")
    if expected is None:
        return parts
    check_weights({n: e.shape for n, e in parts.model.items()}, expected,
                  f"the base weights ({base_path or lora_path})" if base_path else
                  f"{lora_path} (no base recorded; pass --base_checkpoint)")
    return parts


def _check_fit(pairs: dict[str, tuple[str, str]], model: dict[str, Entry], lora: dict[str, Entry],
               lora_path: str, magnitudes: dict[str, str]) -> None:
    """Every adapter pair adapts a weight of the model, with shapes that fit it (a DoRA magnitude: one value per
    output row)."""
    problems = [f"{m} has shape {list(lora[m].shape)}, not [{model[w].shape[0]}]" for w, m in magnitudes.items()
                if w in model and tuple(lora[m].shape) != (model[w].shape[0],)]
    for w, (a, b) in pairs.items():
        if w not in model:
            problems.append(f"{a} adapts {w}, which the model has not")
            continue
        (out, inn), sa, sb = model[w].shape, lora[a].shape, lora[b].shape
        if len(sa) != 2 or len(sb) != 2 or sa[1] != inn or sb[0] != out or sa[0] != sb[1]:
            problems.append(f"{w} {list(model[w].shape)} cannot take A {list(sa)} and B {list(sb)}")
    if problems:
        raise CheckpointError(f"{lora_path} does not fit its base: {'; '.join(problems)}. Use the base it was "
                              f"trained on.")


def _destination(dst_dir: str, output_format: str, lora_path: str, base_path: str | None) -> str:
    """The file (mftune) or directory (hf) to write; outputs never replace or land inside an input."""
    dst = os.path.realpath(dst_dir)
    in_files, in_dirs = _inputs(lora_path)
    if base_path:
        f, d = _inputs(base_path)
        in_files, in_dirs = in_files | f, in_dirs | d
    target = os.path.join(dst, MERGED_NAME if output_format == "mftune" else MERGED_CKPT)
    if (target in in_files if output_format != "hf" else any(os.path.dirname(f) == dst for f in in_files)) \
            or dst in in_dirs:
        raise CheckpointError(f"dst_ckpt_dir={dst_dir} is invalid: writing there would replace or mix with an input "
                              f"checkpoint. Choose a new directory.")
    return target if output_format != "hf" else dst


def _write(target: str, output_format: str, specs: list, tensors: Iterator[tuple[str, torch.Tensor]],
           metadata: dict[str, str], hf_base: HFBase | None) -> tuple[str, CopyReport | None]:
    """Stream the merged tensors to ``target``; a HF directory goes through a temporary mftune file,
    converted and removed (disk: about twice the model) and completed from ``hf_base``; a .ckpt file
    gets no header. Returns (the output, what a HF directory took from its base)."""
    folder = target if output_format == "hf" else os.path.dirname(os.path.abspath(target))
    check_free_space(folder, specs_bytes(specs) * (2 if output_format == "hf" else 1), "the merged model")
    if output_format == "mftune":
        write_safetensors_streaming(target, specs, tensors, metadata)
        return target, None
    if output_format != "hf":  # a MindSpore .ckpt: tensors only
        write_ckpt_streaming(target, specs, tensors)
        return target, None
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge_", dir=target) as tmp:
        merged = os.path.join(tmp, MERGED_NAME)
        write_safetensors_streaming(merged, specs, tensors, metadata)
        report = convert_mftune_to_hf(merged, target, base_model_dir=hf_base)
    return target, report["hf_files"]
