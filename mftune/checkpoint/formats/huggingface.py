"""A Hugging Face Llama directory: ``config.json`` plus ``model.safetensors``, sharded safetensors
with their index, or ``pytorch_model*.bin`` (transformers' preference order, ``WEIGHT_FILES``).

Read in place, nothing written: tensor names translate through ``mftune.checkpoint.names`` (rotary
``inv_freq`` buffers of older transformers versions are skipped), ``config.json`` translates into a
``model_config``. ``.bin`` files are memory-mapped (zip-format state dicts, ``weights_only``).
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mftune.checkpoint.entries import Entry, safetensors_entries, tensor_entries
from mftune.checkpoint.names import hf_config_to_model_config, hf_to_mftune, is_hf_buffer
from mftune.checkpoint.safetensors_io import read_tensor, tensor_specs
from mftune.errors import CheckpointError

# transformers' weight files, in the order it prefers them.
WEIGHT_FILES = (("model.safetensors.index.json", "safetensors"), ("model.safetensors", "safetensors"),
                ("pytorch_model.bin.index.json", "bin"), ("pytorch_model.bin", "bin"))


@dataclass
class HFSource:
    """A Hugging Face model directory: its weight files in reading order; config.json read when asked."""
    directory: str
    files: list[str]  # absolute paths
    kind: str  # "safetensors" | "bin"
    weight_map: dict[str, str] | None  # tensor name -> file name, from the index
    key: str = "input_path"  # how the user named the path, for messages

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """config.json (reading the weights does not need it)."""
        return _read_json(os.path.join(self.directory, "config.json"), self.key, self.directory)


def matches(path: str) -> bool:
    """A directory with config.json and one of transformers' weight files."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, name)) for name, _ in WEIGHT_FILES)


def find_source(input_path: str, key: str = "input_path") -> HFSource:
    """Resolve a HF directory, or a weight/index file inside one (MindFormers users pass a file);
    ``key`` is the option that named it, for messages."""
    path = os.path.abspath(input_path)
    if not os.path.exists(path):
        raise CheckpointError(f"{key}={input_path} is invalid: it does not exist. Pass a Hugging Face "
                              f"model directory (config.json + weights) or a weight file inside one.")
    directory, given = (path, "") if os.path.isdir(path) else os.path.split(path)
    candidates = [(n, k) for n, k in WEIGHT_FILES if os.path.isfile(os.path.join(directory, n))]
    if given and given != "config.json":  # a weight file picks its format: .bin or .safetensors
        kind = re.search(r"\.(bin|safetensors)(\.index\.json)?$", given)
        candidates = [(n, k) for n, k in candidates if kind and k == kind[1]]
    if not os.path.isfile(os.path.join(directory, "config.json")) or not candidates:
        raise CheckpointError(
            f"{key}={input_path} is invalid: {directory} needs config.json and one of "
            f"{', '.join(n for n, _ in WEIGHT_FILES)}. Pass a directory written by transformers' save_pretrained "
            f"(or downloaded from the Hub), or a weight file inside it.")
    name, kind = candidates[0]
    weight_map = _read_json(os.path.join(directory, name), key, input_path).get("weight_map") \
        if name.endswith(".json") else None
    if name.endswith(".json") and not isinstance(weight_map, dict):
        raise CheckpointError(f"{key}={input_path} is invalid: {name} in {directory} has no weight_map. "
                              f"Download the index again or pass a complete directory.")
    files = list(dict.fromkeys(weight_map.values())) if weight_map else [name]
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise CheckpointError(f"{os.path.join(directory, name)} lists shard file(s) that are missing: "
                              f"{', '.join(missing)}. Download them again or pass a complete directory.")
    return HFSource(directory, [os.path.join(directory, f) for f in files], kind, weight_map, key)


def _read_json(path: str, key: str, given: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return data
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{key}={given} is invalid: unreadable JSON in {os.path.dirname(path)} "
                              f"({exc}).") from None


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped: a tensor's bytes are read when it is used."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles; mmap refuses pre-2020 (non-zip) files
        raise CheckpointError(f"{path} is not a zip-format tensor state dict ({str(exc).splitlines()[0]}). "
                              f"Re-save it with transformers' save_pretrained.") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors. Re-save it with save_pretrained.")
    return sd


def file_specs(path: str, kind: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor in one weight file, in reading order, without reading data."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in load_bin(path).items()} if kind == "bin" else tensor_specs(path)
    return [(k, dt, shape) for k, (dt, shape) in specs.items()]


def read_file(path: str, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, in ``file_specs`` order."""
    if kind == "bin":
        sd = load_bin(path)
        for k in list(sd):
            yield k, sd.pop(k)
        return
    for k in tensor_specs(path):
        yield k, read_tensor(path, k)


def iter_hf_tensors(input_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor of a HF directory, across its shards, one at a time."""
    src = find_source(input_path)
    for path in src.files:
        yield from read_file(path, src.kind)


def entries(path: str) -> dict[str, Entry]:
    """Every weight of the directory, by mftune name."""
    unknown: list[str] = []

    def rename(hf_name: str) -> str | None:
        if is_hf_buffer(hf_name):
            return None
        try:
            return hf_to_mftune(hf_name)
        except KeyError:
            unknown.append(hf_name)
            return None

    out: dict[str, Entry] = {}
    src = find_source(path, key="load_checkpoint")
    for file in src.files:
        if src.kind == "safetensors":
            out.update(safetensors_entries(file, rename))
        else:
            renamed = {rename(k): t for k, t in load_bin(file).items()}
            out.update(tensor_entries({k: t for k, t in renamed.items() if k is not None}, file))
    if unknown:
        raise CheckpointError(f"Hugging Face checkpoint {path} has tensors that are not Llama weights: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Use a "
                              f"LlamaForCausalLM checkpoint.")
    return out


def header(path: str) -> dict[str, Any]:
    """``{"model_config": ...}`` translated from config.json."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return {"model_config": hf_config_to_model_config(json.load(f))}
    except ValueError as exc:
        raise CheckpointError(f"{path}/config.json: {exc}") from None
