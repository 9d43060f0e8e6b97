"""Hugging Face Llama directory <-> complete mftune safetensors file (or MindSpore ``.ckpt`` file), one
tensor at a time.

Names and config.json keys translate through ``mftune.checkpoint.names`` (the one table, STYLE #6);
the Hugging Face directory is read by ``mftune.checkpoint.formats.huggingface``; this module only
moves bytes. Invariants:
- Peak memory is about one tensor (one shard for a ``.bin``, which is memory-mapped): dtypes and
  shapes come from file headers, so the output header is written first and the tensors follow one
  by one (``safetensors_io.write_safetensors_streaming``).
- Everything is checked before a byte is written: unknown names (all of them), missing shard files,
  missing weights, shapes against the model config.
- Outputs go to a temporary name, are fsynced and renamed into place; inputs are never modified.
- A ``.ckpt`` output is a MindSpore checkpoint (``mftune.checkpoint.mindspore.ckpt``): the same names,
  no header (MindSpore's files hold tensors only); a ``.ckpt`` input records no model_config, so the
  reversed conversion takes one (``model_config``: the YAML's ``model.model_config``).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mftune.checkpoint.formats.huggingface import HFSource, file_specs, find_source, read_file
from mftune.checkpoint.formats.mindspore_ckpt import file_entries
from mftune.checkpoint.hf_files import HFBase, check_base_config, complete_model_dir, resolve_base
from mftune.checkpoint.keys import LORA_MARK, OPTIMIZER_PREFIXES, PET_MARK, SCALAR_KEYS, is_init_factor
from mftune.checkpoint.mindspore.ckpt import is_ckpt, write_ckpt_streaming
from mftune.checkpoint.model_weights import check_weights, expected_weights
from mftune.checkpoint.names import (hf_config_to_model_config, hf_to_mftune, is_hf_buffer, mftune_to_hf,
                                     model_config_to_hf_config)
from mftune.checkpoint.safetensors_io import (Spec, encode_metadata, read_metadata, read_tensor, tensor_specs,
                                              write_safetensors_streaming)
from mftune.config.load import read_yaml
from mftune.errors import CheckpointError, ConfigError
from mftune.fileio import atomic_open, check_free_space, specs_bytes
from mftune.log import Progress, with_progress
from mftune.models.config import to_dtype

logger = logging.getLogger("mftune")

_HF_OUTPUT = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5 * 10**9, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 (transformers' max_shard_size units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    value = int(float(m[1]) * _UNITS[(m[2] or "B").upper()]) if m else 0
    if value < 1:
        raise CheckpointError(f"max_shard_size={size} is invalid: not a positive size. Use e.g. 5GB, 500MB, 2GiB "
                              f"or a byte count.")
    return value


def _cast(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The output dtype: ``target`` for floating tensors when given, else unchanged."""
    return target if target is not None and dtype.is_floating_point else dtype


def _long(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def yaml_model_config(path: str) -> dict[str, Any]:
    """``model.model_config`` of a MindFormers YAML (``base_config`` merged): the model config of a
    checkpoint that records none (a MindSpore ``.ckpt``)."""
    mc = (read_yaml(path).get("model") or {}).get("model_config")
    if not isinstance(mc, dict):
        raise ConfigError([f"config={path!r} is invalid: it has no model.model_config mapping. Pass the YAML "
                           f"the checkpoint was trained with (e.g. configs/llama2/lora_llama2_7b.yaml)."], path)
    return dict(mc)


# ----------------------------------------------------------------------------------------------
# Hugging Face -> mftune
# ----------------------------------------------------------------------------------------------

def convert_hf_to_mftune(input_path: str, output_path: str, dtype: str | None = None,
                         progress: Progress | None = None) -> dict[str, Any]:
    """HF Llama directory (or a weight file in it) -> one complete mftune safetensors file, or a
    MindSpore ``.ckpt`` file when ``output_path`` ends with ``.ckpt`` (the same names, no header).

    The header carries what ``save_complete`` writes (``format``, ``mftune_model_config``) plus
    ``mftune_source``. ``dtype`` casts floating tensors and sets ``param_init_type``; default: keep.
    Rotary ``inv_freq`` buffers and, when tied, ``lm_head.weight`` are skipped. Returns a report.
    """
    start, src = time.perf_counter(), find_source(input_path)
    out = os.path.abspath(output_path)
    if out == os.path.abspath(input_path) or out in src.files or os.path.isdir(out):
        raise CheckpointError(f"output_path={output_path} is invalid: it is the input or a directory. "
                              f"Name a new .safetensors (or MindSpore .ckpt) file.")
    try:
        mc = hf_config_to_model_config(src.config)
    except ValueError as exc:
        raise CheckpointError(f"{src.directory}/config.json: {exc}") from None
    target = to_dtype(dtype) if dtype else None
    if target is not None:
        mc["param_init_type"] = _long(target)
    cfg, expected = expected_weights(mc, src.directory)
    specs, skipped = _hf_specs(src, cfg.tie_word_embeddings, target)
    check_weights({n: s for n, _, s in specs}, expected, src.directory)
    if skipped:
        logger.info("Skipped %d tensors that are not separate weights (rotary buffers, tied lm_head): %s",
                    len(skipped), ", ".join(sorted(skipped)))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        # the progress bar counts ints: an iterator holds its last item, and that must not be a tensor
        ticks = iter(with_progress(progress, range(len(specs)), len(specs)))
        for path in src.files:
            for name, tensor in read_file(path, src.kind):
                if name not in skipped:
                    next(ticks, None)
                    yield hf_to_mftune(name), tensor.to(_cast(tensor.dtype, target))
                del tensor  # before the next one is read
        next(ticks, None)  # lets the bar see the end

    source = {"format": "huggingface", "path": src.directory, "files": [os.path.basename(f) for f in src.files],
              "dtype": _long(target) if target else "source"}
    check_free_space(os.path.dirname(out), specs_bytes(specs), f"the converted checkpoint {os.path.basename(out)}")
    if is_ckpt(out):
        size = write_ckpt_streaming(out, specs, stream())
    else:
        metadata = encode_metadata({"model_config": mc, "source": source})
        size = write_safetensors_streaming(out, specs, stream(), metadata)
    return {"output": out, "files": [out], "tensors": len(specs), "bytes": size, "skipped": sorted(skipped),
            "seconds": time.perf_counter() - start}


def _hf_specs(src: HFSource, tie: bool, target: torch.dtype | None) -> tuple[list[Spec], set[str]]:
    """(the output file's specs in reading order, the HF names skipped); every unknown name, and
    every tensor the index places in a shard that lacks it, is an error naming them all."""
    specs, skipped, unknown, where = [], set(), [], {}
    for path in src.files:
        for name, dt, shape in file_specs(path, src.kind):
            where[name] = os.path.basename(path)
            if is_hf_buffer(name) or (tie and name == "lm_head.weight"):
                skipped.add(name)
                continue
            try:
                specs.append((hf_to_mftune(name), _cast(dt, target), shape))
            except KeyError:
                unknown.append(name)
    if unknown:
        raise CheckpointError(f"{src.directory} holds {len(unknown)} tensor(s) that are not Llama weights: "
                              f"{', '.join(unknown)}. mftune converts Llama checkpoints only (names in "
                              f"mftune/checkpoint/names.py); remove them or use the model's own converter.")
    absent = [f"{n} ({f})" for n, f in (src.weight_map or {}).items() if where.get(n) != os.path.basename(f)]
    if absent:
        raise CheckpointError(f"{src.directory}: the index lists tensors that are not in their shard file: "
                              f"{', '.join(absent)}. Download the shards again.")
    return specs, skipped


# ----------------------------------------------------------------------------------------------
# mftune -> Hugging Face
# ----------------------------------------------------------------------------------------------

def _plan_shards(specs: list[Spec], limit: int) -> list[list[Spec]]:
    """transformers' greedy split: a shard is closed when the next tensor would pass ``limit``."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _skip_reason(name: str, tie: bool) -> str | None:
    """Why a tensor of a complete mftune file is not written to a HF directory (None: it is not skipped)."""
    if name.startswith(OPTIMIZER_PREFIXES):
        return "optimizer moments (adam_m.*, adam_v.*)"
    if name in SCALAR_KEYS:
        return "training counters (epoch_num, step_num, ...)"
    if LORA_MARK in name:
        return (f"LoRA adapter tensors (*{LORA_MARK}*): merge it first with scripts/transform_ckpt_lora.py "
                "or export it with scripts/export_adapter.py")
    if is_init_factor(name):
        return "PiSSA / OLoRA initial factors (mindpet_delta_init_*: derived from the base)"
    if PET_MARK in name:  # a prefix (prefix tuning, P-tuning v2): no Hugging Face weight holds it
        return (f"prefix tensors (*{PET_MARK}*): a prefix cannot be merged into weights; export it with "
                "scripts/export_adapter.py (a PEFT prefix-tuning adapter)")
    if tie and name == "lm_head.weight":
        return "tied lm_head.weight (tie_word_embeddings: transformers re-ties it on load)"
    return None


def convert_mftune_to_hf(input_path: str, output_dir: str, max_shard_size: int | str = "5GB",
                         dtype: str | None = None, progress: Progress | None = None,
                         model_config: dict[str, Any] | None = None,
                         base_model_dir: str | HFBase | None = None) -> dict[str, Any]:
    """Complete mftune file (or MindSpore ``.ckpt``) -> HF directory: config.json, ``model.safetensors``
    or shards of at most ``max_shard_size`` named ``model-0000i-of-0000N.safetensors`` plus
    transformers' index. Tensors that are not base weights are skipped with one log line per kind;
    stale shards of an earlier save in ``output_dir`` are removed (as transformers does) so that the
    new index is the only one. ``model_config``: the model's config when the file records none.
    ``base_model_dir``: the Hugging Face directory whose config.json, generation_config.json and
    tokenizer files complete the output (``mftune.checkpoint.hf_files``); default: the one the file
    records as its origin. The report's ``hf_files`` says what was copied and what is missing."""
    start, src, out = time.perf_counter(), os.path.abspath(input_path), os.path.abspath(output_dir)
    if os.path.isdir(src) or os.path.isfile(out) or out == os.path.dirname(src):
        raise CheckpointError(f"input_path={input_path}, output_path={output_dir} is invalid: reversed conversion "
                              f"reads one mftune .safetensors (or MindSpore .ckpt) file and writes a new directory "
                              f"next to it.")
    meta, found, read = _complete_source(src, input_path)
    limit = parse_size(max_shard_size)
    mc = dict(model_config or meta.get("model_config") or {})
    if not mc:
        what = ("a MindSpore .ckpt, which records no model config" if is_ckpt(src) else
                "not a complete mftune checkpoint (no mftune_model_config header)")
        raise CheckpointError(f"input_path={input_path} is invalid: it is {what}. Pass --config with the YAML of "
                              f"the model (its model.model_config is used), or a file written by convert_weight.py "
                              f"or run_finetune.py.")
    cfg, expected = expected_weights(mc, src)
    header, skipped = _checked_mftune_header(src, found, expected, cfg.tie_word_embeddings)
    target = to_dtype(dtype) if dtype else None
    specs = [(mftune_to_hf(n), _cast(header[n][0], target), expected[n]) for n in expected]  # model order
    try:
        hf_config = model_config_to_hf_config(mc)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    dtypes = {d for _, d, _ in specs}
    file_dtype = _long(dtypes.pop()) if len(dtypes) == 1 else None  # what the files hold, whatever param_init_type
    hf_config["torch_dtype"] = file_dtype or hf_config["torch_dtype"]
    base = base_model_dir if isinstance(base_model_dir, HFBase) else resolve_base(base_model_dir, src)
    if base.directory and os.path.realpath(base.directory) == os.path.realpath(out):
        raise CheckpointError(f"output_path={output_dir} is invalid: it is the base model's Hugging Face directory "
                              f"({base.how}), which would be overwritten. Choose a new directory.")
    check_base_config(base, hf_config)  # before a byte is written
    check_free_space(out, specs_bytes(specs), "the Hugging Face weights")
    total, written = _write_hf_weights(read, out, specs, list(expected), _plan_shards(specs, limit), target, progress)
    files = complete_model_dir(base, out, hf_config, file_dtype)
    written += [f for f in files.copied if f not in written]
    for stale in sorted(set(os.listdir(out)) - set(written)):
        if _HF_OUTPUT.match(stale):
            logger.info("Removed %s, left in %s by an earlier save", stale, out)
            os.remove(os.path.join(out, stale))
    return {"output": out, "files": [os.path.join(out, f) for f in written], "tensors": len(specs), "bytes": total,
            "skipped": skipped, "hf_files": files, "seconds": time.perf_counter() - start}


def _complete_source(src: str, input_path: str) -> tuple[dict[str, Any], dict[str, tuple[torch.dtype, tuple[int, ...]]],
                                                       Callable[[str], torch.Tensor]]:
    """(header, ``{name: (dtype, shape)}``, read(name)) of a complete mftune file or a ``.ckpt`` file."""
    if is_ckpt(src):
        entries = file_entries(src)
        return {}, {n: (e.dtype, e.shape) for n, e in entries.items()}, lambda n: entries[n].full()
    meta = read_metadata(src)
    if "shards" in meta:
        raise CheckpointError(f"input_path={input_path} is invalid: it is not a complete mftune checkpoint (it "
                              f"holds one rank's shards). Merge the rank files first with "
                              f"scripts/transform_checkpoint.py.")
    return meta, tensor_specs(src), lambda n: read_tensor(src, n)


def _checked_mftune_header(src: str, header: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                           expected: dict[str, tuple[int, ...]], tie: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's ``{name: (dtype, shape)}``, checked (no unknown name, every weight of its model
    there), and how many tensors of each kind that is not a base weight it holds."""
    skipped, unknown = {}, []
    for name in header:
        reason = None if name in expected else _skip_reason(name, tie)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        elif name not in expected:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{src} holds {len(unknown)} tensor(s) with unknown names: {', '.join(unknown)}. "
                              f"mftune converts Llama weights (names in mftune/checkpoint/names.py).")
    check_weights({n: shape for n, (_, shape) in header.items()}, expected, src)
    for reason, count in skipped.items():
        logger.info("Skipped %d %s", count, reason)
    return header, skipped


def _write_hf_weights(read_source: Callable[[str], torch.Tensor], out: str, specs: list[Spec], names: list[str],
                      shards: list[list[Spec]], target: torch.dtype | None,
                      progress: Progress | None) -> tuple[int, list[str]]:
    """The weight files (and the index when sharded) of ``out``; returns (data bytes, files written)."""
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    def read(name: str) -> torch.Tensor:
        tensor = read_source(name)
        return tensor.to(_cast(tensor.dtype, target))

    ticks = iter(with_progress(progress, names, len(specs)))  # the bar holds a name, not a tensor
    stream = ((mftune_to_hf(n), read(n)) for n in ticks)
    total = sum(write_safetensors_streaming(os.path.join(out, file), shard, itertools.islice(stream, len(shard)),
                                            {"format": "pt"}) for file, shard in zip(files, shards, strict=True))
    next(ticks, None)  # lets a progress bar see the end
    written = [*files, "config.json"]
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name, _, _ in shard}
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")
    return total, written


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
