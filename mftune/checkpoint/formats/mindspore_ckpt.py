"""A MindSpore ``.ckpt`` checkpoint (MindFormers' complete checkpoint): one file, or a directory of
them loaded together (MindFormers' ``load_checkpoint: dir/``, e.g. a base and a LoRA checkpoint;
complete mftune ``.safetensors`` files beside them join in; a name in two files is an error).

Read without MindSpore (``mftune.checkpoint.mindspore.ckpt``): each tensor is an entry reading its
blocks straight from the file. Names are MindFormers' = mftune's for weights, LoRA factors and AdamW
moments; MindFormers' counters become mftune's (``mindspore.names``: ``step_num`` -> ``global_step``,
the optimizer's ``global_step`` -> ``optimizer_step``, ...); other MindSpore training state (the
loss-scale wrapper's and the optimizer's bookkeeping, strings saved through ``append_dict``) is
listed by ``others`` and not given as entries. A ``.ckpt`` file records no model_config: the header
is empty (a directory's is its mftune files' headers).

A directory with ``rank_*/`` folders is not this format: see ``formats.mindspore_ranks``.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any

from mftune.checkpoint.entries import Entry, merge_entries, safetensors_entries, tensor_entries
from mftune.checkpoint.formats import file_dir
from mftune.checkpoint.formats.distributed import rank_dirs
from mftune.checkpoint.mindspore.ckpt import ckpt_index, is_ckpt, read_block, read_tensor
from mftune.checkpoint.mindspore.names import COUNTER_SOURCES, is_mindspore_state, mftune_counters, mftune_name

logger = logging.getLogger("mftune")


def matches(path: str) -> bool:
    if os.path.isfile(path):
        return is_ckpt(path)
    return os.path.isdir(path) and bool(ckpt_files(path)) and not rank_dirs(path)


def ckpt_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(path), "*.ckpt")))


def entries(path: str) -> dict[str, Entry]:
    if os.path.isfile(path):
        return file_entries(path)
    return merge_entries(path, [file_entries(f) for f in ckpt_files(path)] +
                         [safetensors_entries(f) for f in file_dir.files(path)])


def header(path: str) -> dict[str, Any]:
    """Empty for a file (a .ckpt records no configs); for a directory, its mftune files' headers."""
    return {} if os.path.isfile(path) else file_dir.header(path)


def file_entries(path: str) -> dict[str, Entry]:
    """The tensors of one ``.ckpt`` file by mftune name: weights, LoRA factors, AdamW moments, counters."""
    index = ckpt_index(path)
    out = {}
    for name, stored in index.tensors.items():
        if not is_mindspore_state(name):
            out[mftune_name(name)] = Entry(stored.shape, lambda block, name=name: read_block(path, name, block),
                                           path, stored.dtype,
                                           lambda block, o, name=name: read_block(path, name, block, o))
    counters = mftune_counters({n: read_tensor(path, n) for n in COUNTER_SOURCES if n in index.tensors})
    out.update(tensor_entries(counters, path))
    skipped = sorted(others(path))
    if skipped:
        logger.info("Checkpoint %s: %d MindSpore entries are not used by mftune (e.g. %s)", path, len(skipped),
                    ", ".join(skipped[:3]))
    return out


def others(path: str) -> dict[str, str]:
    """What a ``.ckpt`` file holds besides what ``file_entries`` gives, by tag: what it is."""
    index = ckpt_index(path)
    state = {n: "MindSpore training state" for n in index.tensors
             if is_mindspore_state(n) and n not in COUNTER_SOURCES}
    return {**state, **index.others}
