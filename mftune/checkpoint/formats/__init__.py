"""What a checkpoint path is, and its tensors and header, whatever its format.

Each on-disk format is one module with ``matches(path)``, ``entries(path)`` (``{mftune
name: Entry}``) and ``header(path)`` (the mftune header: model_config, pet_config, base_checkpoint,
... when recorded). ``FORMATS`` lists them in the order they are tried: a path is read by the first
that matches (files and directories are matched by different modules, so only the order among
each kind matters). Adding a format is a new module plus one line in ``FORMATS``. A distributed
MindSpore checkpoint is also read with the strategy files of the run that saved it
(``src_strategy``: the ``src_strategy_path_or_dir`` option); other formats ignore it.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from mftune.checkpoint.entries import Entry
from mftune.checkpoint.fused import split_fused
from mftune.checkpoint.formats import (distributed, file_dir, huggingface, mindspore_ckpt, mindspore_ranks,
                                       peft_adapter, peft_prefix, single_file)
from mftune.errors import CheckpointError

FORMATS: tuple[ModuleType, ...] = (
    peft_prefix,  # adapter_config.json of peft_type PREFIX_TUNING (+ complete files beside it)
    peft_adapter,  # adapter_config.json (+ complete files beside it)
    huggingface,  # config.json + transformers' weight files
    mindspore_ckpt,  # a MindSpore .ckpt file, or a directory of them (no rank_*/ folders)
    single_file,  # any other file: a complete mftune .safetensors file
    mindspore_ranks,  # rank_*/ folders of .ckpt files (+ the MindSpore strategy of the run)
    distributed,  # rank_*/ folders of mftune .safetensors files
    file_dir,  # any other directory: its complete .safetensors files together
)


MINDSPORE_FORMATS: tuple[ModuleType, ...] = (mindspore_ckpt, mindspore_ranks)  # MindSpore's own files


def recognise(path: str) -> ModuleType:
    """The format module that reads ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"load_checkpoint={path} does not exist. Give a checkpoint file or directory.")
    found = next((fmt for fmt in FORMATS if fmt.matches(path)), None)
    if found is None:
        raise CheckpointError(f"load_checkpoint={path} is neither a file nor a directory. Give a checkpoint file or "
                              f"directory.")
    return found


def reads_strategy(fmt: ModuleType) -> bool:
    """Whether a format reads its layout from a strategy file (``entries(path, src_strategy)``) rather than
    from the checkpoint itself (a format module says so with ``NEEDS_STRATEGY = True``)."""
    return getattr(fmt, "NEEDS_STRATEGY", False)


def open_checkpoint(path: str, src_strategy: str = "") -> dict[str, Entry]:
    """Every tensor ``path`` provides, by mftune name (``src_strategy``: the strategy a distributed
    MindSpore checkpoint was saved with)."""
    fmt = recognise(path)
    entries = fmt.entries(path, src_strategy) if reads_strategy(fmt) else fmt.entries(path)
    return split_fused(entries)  # MindFormers' qkv_concat checkpoints: w_qkv / w_gate_hidden split


def checkpoint_header(path: str) -> dict[str, Any]:
    """The mftune header of the checkpoint at ``path`` (empty when it records none)."""
    return recognise(path).header(path)
