"""Hugging Face Llama directory <-> complete mftune safetensors file, one tensor at a time.

Names and config.json keys translate through ``mftune.checkpoint.names`` (the one table, STYLE #6);
this module only moves bytes. Invariants:
- Peak memory is about one tensor (one shard for a ``.bin``, which is memory-mapped): dtypes and
  shapes come from file headers, so the output header is written first and the tensors follow one
  by one (safetensors' ``save_file`` would want the whole state dict at once).
- Everything is checked before a byte is written: unknown names (all of them), missing shard files,
  missing weights, shapes against the model config.
- Outputs go to a temporary name, are fsynced and renamed into place; inputs are never modified.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from mftune.checkpoint.io import (LORA_MARK, OPTIMIZER_PREFIXES, SCALAR_KEYS, CheckpointError, atomic_open,
                                 read_metadata)
from mftune.checkpoint.names import (hf_config_to_model_config, hf_to_mftune, is_hf_buffer, mftune_to_hf,
                                     model_config_to_hf_config)
from mftune.checkpoint.sources import FROM_ST, ST_DTYPES, read_tensor, safetensors_header
from mftune.models.llama import LlamaConfig, LlamaForCausalLM, to_dtype

logger = logging.getLogger("mftune")

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape)
Progress = Callable[[Iterable, int], Iterable]  # (items, total) -> the same items, e.g. tqdm


def with_progress(progress: Progress | None, items: Iterable, total: int) -> Iterable:
    """``items`` through ``progress`` (a bar), or as they are without one."""
    return items if progress is None else progress(items, total)


# transformers' weight files, in the order it prefers them.
HF_WEIGHTS = (("model.safetensors.index.json", "safetensors"), ("model.safetensors", "safetensors"),
              ("pytorch_model.bin.index.json", "bin"), ("pytorch_model.bin", "bin"))
_HF_OUTPUT = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def write_safetensors_streaming(path: str, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose header is built from ``specs`` before any tensor is read.

    ``tensors`` yields ``(name, tensor)`` in ``specs`` order (e.g. a generator reading one at a time),
    each checked against its spec. Layout (safetensors'): 8-byte little-endian header length, JSON header
    (``__metadata__`` str -> str, then per tensor dtype, shape and ``data_offsets`` into the data section)
    padded with spaces to a multiple of 8, then the raw bytes. Atomic. Returns the number of data bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if name in header or dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} ({dtype}) cannot be written to {path}: duplicate name or dtype.")
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        stream = iter(tensors)
        for spec in specs:
            name, tensor = next(stream, (None, None))
            got = None if tensor is None else (name, tensor.dtype, tuple(tensor.shape))
            if got != tuple(spec):
                raise CheckpointError(f"writing {path}: expected tensor {spec}, got {got}.")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # not held while the next one is read: peak ~ one tensor
        if next(stream, None) is not None:
            raise CheckpointError(f"writing {path}: more tensors than the {len(specs)} in its header.")
    return offset


@dataclass
class HFSource:
    """A Hugging Face model directory: config.json and its weight files, in reading order."""
    directory: str
    config: dict[str, Any]
    files: list[str]  # absolute paths
    kind: str  # "safetensors" | "bin"
    weight_map: dict[str, str] | None  # tensor name -> file name, from the index


def find_hf_source(input_path: str) -> HFSource:
    """Resolve a HF directory, or a weight/index file inside one (MindFormers users pass a file)."""
    path = os.path.abspath(input_path)
    if not os.path.exists(path):
        raise CheckpointError(f"input_path={input_path} is invalid: it does not exist. Pass a Hugging Face "
                              f"model directory (config.json + weights) or a weight file inside one.")
    directory, given = (path, "") if os.path.isdir(path) else os.path.split(path)
    candidates = [(n, k) for n, k in HF_WEIGHTS if os.path.isfile(os.path.join(directory, n))]
    if given and given != "config.json":  # a weight file picks its format: .bin or .safetensors
        kind = re.search(r"\.(bin|safetensors)(\.index\.json)?$", given)
        candidates = [(n, k) for n, k in candidates if kind and k == kind[1]]
    if not os.path.isfile(os.path.join(directory, "config.json")) or not candidates:
        raise CheckpointError(
            f"input_path={input_path} is invalid: {directory} needs config.json and one of "
            f"{', '.join(n for n, _ in HF_WEIGHTS)}. Pass a directory written by transformers' save_pretrained "
            f"(or downloaded from the Hub), or a weight file inside it.")
    name, kind = candidates[0]
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(directory, name)) if name.endswith(".json") else contextlib.nullcontext() as f:
            weight_map = json.load(f)["weight_map"] if f else None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"input_path={input_path} is invalid: unreadable JSON in {directory} ({exc}).") from None
    files = list(dict.fromkeys(weight_map.values())) if weight_map else [name]
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise CheckpointError(f"{os.path.join(directory, name)} lists shard file(s) that are missing: "
                              f"{', '.join(missing)}. Download them again or pass a complete directory.")
    return HFSource(directory, config, [os.path.join(directory, f) for f in files], kind, weight_map)


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped: a tensor's bytes are read when it is used."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles; mmap refuses pre-2020 (non-zip) files
        raise CheckpointError(f"{path} is not a zip-format tensor state dict ({str(exc).splitlines()[0]}). "
                              f"Re-save it with transformers' save_pretrained.") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors. Re-save it with save_pretrained.")
    return sd


def _st_header(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, in data order, without reading tensor data."""
    _, header, _ = safetensors_header(path)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: (FROM_ST[v["dtype"]], tuple(v["shape"])) for k, v in entries}


def _file_specs(path: str, kind: str) -> list[Spec]:
    """(name, dtype, shape) of every tensor in one weight file, in reading order, without reading data."""
    header = {k: (v.dtype, tuple(v.shape)) for k, v in _load_bin(path).items()} if kind == "bin" else _st_header(path)
    return [(k, dt, shape) for k, (dt, shape) in header.items()]


def _read_file(path: str, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, in ``_file_specs`` order (safetensors: read with plain reads,
    nothing stays mapped)."""
    if kind == "bin":
        sd = _load_bin(path)
        for k in list(sd):
            yield k, sd.pop(k)
        return
    for k in _st_header(path):
        yield k, read_tensor(path, k)


def iter_hf_tensors(input_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor of a HF directory, across its shards, one at a time."""
    src = find_hf_source(input_path)
    for path in src.files:
        yield from _read_file(path, src.kind)


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5 * 10**9, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 (transformers' max_shard_size units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    value = int(float(m[1]) * _UNITS[(m[2] or "B").upper()]) if m else 0
    if value < 1:
        raise CheckpointError(f"max_shard_size={size} is invalid: not a positive size. Use e.g. 5GB, 500MB, 2GiB "
                              f"or a byte count.")
    return value


def _expected_weights(mc: dict[str, Any], where: str) -> tuple[LlamaConfig, dict[str, tuple[int, ...]]]:
    """The model's weight names and shapes (tied lm_head left out), from a build on the meta device."""
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig.from_dict(mc))
    except ValueError as exc:
        raise CheckpointError(f"{where}: its model config is invalid for mftune: {exc}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return model.config, shapes


def _check_weights(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"{n} has shape {list(found[n])}, the config needs {list(s)}" for n, s in expected.items()
                 if n in found and found[n] != s]
    if problems:
        raise CheckpointError(f"{where} does not match its model config: {'; '.join(problems)}. Check that the "
                              f"weights and the config belong to the same model (and that no shard is missing).")


def _cast(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The output dtype: ``target`` for floating tensors when given, else unchanged."""
    return target if target is not None and dtype.is_floating_point else dtype


def _long(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def convert_hf_to_mftune(input_path: str, output_path: str, dtype: str | None = None,
                         progress: Progress | None = None) -> dict[str, Any]:
    """HF Llama directory (or a weight file in it) -> one complete mftune safetensors file.

    The header carries what ``io.save_complete`` writes (``format``, ``mftune_model_config``) plus
    ``mftune_source``. ``dtype`` casts floating tensors and sets ``param_init_type``; default: keep.
    Rotary ``inv_freq`` buffers and, when tied, ``lm_head.weight`` are skipped. Returns a report.
    """
    start, src = time.perf_counter(), find_hf_source(input_path)
    out = os.path.abspath(output_path)
    if out == os.path.abspath(input_path) or out in src.files or os.path.isdir(out):
        raise CheckpointError(f"output_path={output_path} is invalid: it is the input or a directory. "
                              f"Name a new .safetensors file.")
    try:
        mc = hf_config_to_model_config(src.config)
    except ValueError as exc:
        raise CheckpointError(f"{src.directory}/config.json: {exc}") from None
    target = to_dtype(dtype) if dtype else None
    if target is not None:
        mc["param_init_type"] = _long(target)
    cfg, expected = _expected_weights(mc, src.directory)
    specs, skipped, unknown, where = [], set(), [], {}
    for path in src.files:
        for name, dt, shape in _file_specs(path, src.kind):
            where[name] = os.path.basename(path)
            if is_hf_buffer(name) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
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
    _check_weights({n: s for n, _, s in specs}, expected, src.directory)
    if skipped:
        logger.info("Skipped %d tensors that are not separate weights (rotary buffers, tied lm_head): %s",
                    len(skipped), ", ".join(sorted(skipped)))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        # the progress bar counts ints: an iterator holds its last item, and that must not be a tensor
        ticks = iter(with_progress(progress, range(len(specs)), len(specs)))
        for path in src.files:
            for name, tensor in _read_file(path, src.kind):
                if name not in skipped:
                    next(ticks, None)
                    yield hf_to_mftune(name), tensor.to(_cast(tensor.dtype, target))
                del tensor  # before the next one is read
        next(ticks, None)  # lets the bar see the end

    source = {"format": "huggingface", "path": src.directory, "files": [os.path.basename(f) for f in src.files],
              "dtype": _long(target) if target else "source"}
    metadata = {"format": "pt", "mftune_model_config": json.dumps(mc, default=str),
                "mftune_source": json.dumps(source)}
    size = write_safetensors_streaming(out, specs, stream(), metadata)
    return {"output": out, "files": [out], "tensors": len(specs), "bytes": size, "skipped": sorted(skipped),
            "seconds": time.perf_counter() - start}


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
        return ("LoRA adapter tensors (*mindpet_delta_lora*): merge it first with scripts/transform_ckpt_lora.py "
                "or export it with scripts/export_adapter.py")
    if tie and name == "lm_head.weight":
        return "tied lm_head.weight (tie_word_embeddings: transformers re-ties it on load)"
    return None


def convert_mftune_to_hf(input_path: str, output_dir: str, max_shard_size: int | str = "5GB",
                         dtype: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Complete mftune file -> HF directory: config.json, ``model.safetensors`` or shards of at most
    ``max_shard_size`` named ``model-0000i-of-0000N.safetensors`` plus transformers' index. Tensors
    that are not base weights are skipped with one log line per kind; stale shards of an earlier
    save in ``output_dir`` are removed (as transformers does) so that the new index is the only one."""
    start, src, out = time.perf_counter(), os.path.abspath(input_path), os.path.abspath(output_dir)
    if os.path.isdir(src) or os.path.isfile(out) or out == os.path.dirname(src):
        raise CheckpointError(f"input_path={input_path}, output_path={output_dir} is invalid: reversed conversion "
                              f"reads one mftune .safetensors file and writes a new directory next to it.")
    meta, limit = read_metadata(src), parse_size(max_shard_size)
    if "model_config" not in meta or "shards" in meta:
        raise CheckpointError(f"input_path={input_path} is invalid: it is not a complete mftune checkpoint (no "
                              f"mftune_model_config header, or one rank's shards). Pass a file written by "
                              f"convert_weight.py or a complete checkpoint of run_finetune.py.")
    mc = dict(meta["model_config"])
    cfg, expected = _expected_weights(mc, src)
    header, skipped, unknown = _st_header(src), {}, []
    for name in header:
        reason = None if name in expected else _skip_reason(name, cfg.tie_word_embeddings)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        elif name not in expected:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{src} holds {len(unknown)} tensor(s) with unknown names: {', '.join(unknown)}. "
                              f"mftune converts Llama weights (names in mftune/checkpoint/names.py).")
    _check_weights({n: shape for n, (_, shape) in header.items()}, expected, src)
    for reason, count in skipped.items():
        logger.info("Skipped %d %s", count, reason)
    target = to_dtype(dtype) if dtype else None
    specs = [(mftune_to_hf(n), _cast(header[n][0], target), expected[n]) for n in expected]  # model order
    try:
        hf_config = model_config_to_hf_config(mc)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    dtypes = {d for _, d, _ in specs}
    if len(dtypes) == 1:  # what the files hold, whatever param_init_type says
        hf_config["torch_dtype"] = _long(dtypes.pop())
    shards = _plan_shards(specs, limit)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    def read(name: str) -> torch.Tensor:
        tensor = read_tensor(src, name)
        return tensor.to(_cast(tensor.dtype, target))

    names = iter(with_progress(progress, expected, len(specs)))  # the bar holds a name, not a tensor
    stream = ((mftune_to_hf(n), read(n)) for n in names)
    total = sum(write_safetensors_streaming(os.path.join(out, file), shard, itertools.islice(stream, len(shard)),
                                            {"format": "pt"}) for file, shard in zip(files, shards, strict=True))
    next(names, None)  # lets a progress bar see the end
    written = [*files, "config.json"]
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name, _, _ in shard}
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")
    _write_json(os.path.join(out, "config.json"), hf_config)
    for stale in sorted(set(os.listdir(out)) - set(written)):
        if _HF_OUTPUT.match(stale):
            logger.info("Removed %s, left in %s by an earlier save", stale, out)
            os.remove(os.path.join(out, stale))
    return {"output": out, "files": [os.path.join(out, f) for f in written], "tensors": len(specs), "bytes": total,
            "skipped": skipped, "seconds": time.perf_counter() - start}


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
