"""A complete mftune checkpoint: one safetensors file, MindFormers names, configs in the header.

Besides model tensors a file may hold optimizer moments and counters (``mftune.checkpoint.keys``);
its header metadata holds ``mftune_model_config`` (with the pet_config) and whatever the writer
adds (``run_mode``, ``pet_config``, ``base_checkpoint``, ``layout``, ...). One rank's file of a
distributed checkpoint has the same layout plus ``mftune_shards``; it is read through its folder.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from mftune.checkpoint.entries import Entry, safetensors_entries
from mftune.checkpoint.safetensors_io import encode_metadata, read_metadata, save_safetensors


def matches(path: str) -> bool:
    return os.path.isfile(path)


def entries(path: str) -> dict[str, Entry]:
    return safetensors_entries(path)


def header(path: str) -> dict[str, Any]:
    return read_metadata(path)


def save_complete(path: str, tensors: dict[str, torch.Tensor], *, model_config: dict[str, Any],
                  extra_metadata: dict[str, Any] | None = None) -> None:
    """Save a complete checkpoint whose header carries ``model_config`` (with its pet_config)."""
    save_safetensors(tensors, path, encode_metadata({"model_config": model_config, **(extra_metadata or {})}))
