"""A directory of complete mftune files, loaded together (e.g. a base and a LoRA checkpoint, as
MindFormers loads every file of a directory); a tensor name in two files is an error.

Recognised last: any directory that is none of the other formats.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from mftune.checkpoint.entries import Entry, merge_entries, safetensors_entries
from mftune.checkpoint.safetensors_io import read_metadata
from mftune.errors import CheckpointError


def matches(path: str) -> bool:
    return os.path.isdir(path)


def files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))


def entries(path: str) -> dict[str, Entry]:
    found = files(path)
    if not found:
        raise CheckpointError(
            f"load_checkpoint={path} is a directory with no checkpoint mftune recognises: expected "
            f".safetensors files, a Hugging Face model (config.json + weights), a PEFT adapter "
            f"(adapter_config.json) or rank_*/ folders of a distributed checkpoint.")
    return merge_entries(path, [safetensors_entries(f) for f in found])


def header(path: str) -> dict[str, Any]:
    """The files' headers merged, the one with a pet_config (a LoRA checkpoint) first."""
    merged: dict[str, Any] = {}
    for meta in sorted((read_metadata(f) for f in files(path)), key=lambda m: "pet_config" not in m):
        for key, value in meta.items():
            merged.setdefault(key, value)
    return merged
