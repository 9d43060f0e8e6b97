"""What a checkpoint path is, and its tensors and header, whatever its format.

Each on-disk format is one module with ``matches(path)``, ``entries(path)`` (``{mftune
name: Entry}``) and ``header(path)`` (the mftune header: model_config, pet_config, base_checkpoint,
... when recorded). ``FORMATS`` lists them in the order they are tried: a path is read by the first
that matches. Adding a format is a new module plus one line in ``FORMATS``.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from mftune.checkpoint.entries import Entry
from mftune.checkpoint.formats import distributed, file_dir, huggingface, peft_adapter, single_file
from mftune.errors import CheckpointError

FORMATS: tuple[ModuleType, ...] = (
    single_file,  # a complete mftune .safetensors file
    peft_adapter,  # adapter_config.json (+ complete files beside it)
    huggingface,  # config.json + transformers' weight files
    distributed,  # rank_*/ folders
    file_dir,  # any other directory: its complete .safetensors files together
)


def recognise(path: str) -> ModuleType:
    """The format module that reads ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"load_checkpoint={path} does not exist. Give a checkpoint file or directory.")
    found = next((fmt for fmt in FORMATS if fmt.matches(path)), None)
    if found is None:
        raise CheckpointError(f"load_checkpoint={path} is neither a file nor a directory. Give a checkpoint file or "
                              f"directory.")
    return found


def open_checkpoint(path: str) -> dict[str, Entry]:
    """Every tensor ``path`` provides, by mftune name."""
    return recognise(path).entries(path)


def checkpoint_header(path: str) -> dict[str, Any]:
    """The mftune header of the checkpoint at ``path`` (empty when it records none)."""
    return recognise(path).header(path)
