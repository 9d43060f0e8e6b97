"""Complete mftune checkpoints: one safetensors file, MindFormers names, configs in the header.

A complete file may hold, besides model tensors, optimizer moments (``adam_m.<name>``,
``adam_v.<name>``) and MindFormers' scalar counters (``epoch_num``, ``step_num``, ``global_step``,
``loss_scale``, ``global_batch_size``). Loading into a model takes only the model's tensors.
Writes are atomic (temporary file + ``os.replace``), so a crash never leaves a half file.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import struct
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mftune.checkpoint.sources import (CheckpointError, Entry, open_checkpoint, rank_dirs,
                                      rank_file, read_tensor, safetensors_header)
from mftune.parallel.layout import local, local_block

logger = logging.getLogger("mftune")

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")
SCALAR_KEYS = ("epoch_num", "step_num", "global_step", "loss_scale", "global_batch_size",
               "consumed_samples", "optimizer_step", "loss_scale_good_steps", "rng_state", "cuda_rng_state")
LORA_MARK = "mindpet_delta_lora"


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` as safetensors; readers never see a partial file: a temporary
    name, fsync, rename, fsync of the folder (so a crash leaves the old file or the new one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(contiguous, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """A temporary sibling of ``path`` to write; fsynced and renamed onto ``path`` on success,
    removed on failure (readers see the old file or the new one, never a part)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_UMASK)
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_replace(tmp: str, path: str) -> None:
    """``os.replace(tmp, path)`` after flushing ``tmp`` to disk, then flush the folder entry."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_complete(path: str, tensors: dict[str, torch.Tensor], *, model_config: dict[str, Any],
                  extra_metadata: dict[str, Any] | None = None) -> None:
    """Save a complete checkpoint whose header carries ``model_config`` (with its pet_config)."""
    metadata = {"format": "pt", "mftune_model_config": json.dumps(model_config, default=str)}
    for key, value in (extra_metadata or {}).items():
        metadata[f"mftune_{key}"] = json.dumps(value, default=str)
    atomic_save(tensors, path, metadata)


def read_metadata(path: str) -> dict[str, Any]:
    """The ``mftune_*`` header entries of a checkpoint, JSON-decoded, without the prefix."""
    raw = safetensors_header(path)[2]  # parsed once per file version, no memory map
    out = {}
    for key, value in raw.items():
        if key.startswith("mftune_"):
            try:
                out[key[len("mftune_"):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("mftune_"):]] = value
    return out


def checkpoint_header(path: str) -> dict[str, Any]:
    """The mftune header of any checkpoint ``open_checkpoint`` reads (model_config, pet_config,
    base_checkpoint when recorded): a file's own; a distributed directory's rank-0 file; a directory of
    complete files merged (a file with a pet_config first); a HF directory's config.json translated;
    a PEFT adapter's pet_config."""
    if os.path.isfile(path):
        return read_metadata(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist. Give a checkpoint file or directory.")
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from mftune.checkpoint.peft import read_peft_adapter
        return {"pet_config": read_peft_adapter(path)[1]}
    if os.path.exists(os.path.join(path, "config.json")):
        from mftune.checkpoint.names import hf_config_to_model_config
        try:
            with open(os.path.join(path, "config.json")) as f:
                return {"model_config": hf_config_to_model_config(json.load(f))}
        except ValueError as exc:
            raise CheckpointError(f"{path}/config.json: {exc}") from None
    ranks = rank_dirs(path)
    if ranks:
        return read_metadata(rank_file(ranks[0]))
    header: dict[str, Any] = {}
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    for meta in sorted((read_metadata(f) for f in files), key=lambda m: "pet_config" not in m):
        for key, value in meta.items():
            header.setdefault(key, value)
    return header


def fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint: sha256 of a safetensors file's size and JSON header (names,
    shapes, offsets, metadata); a directory hashes each file's name and size (and header) in order."""
    if os.path.isfile(path):
        return hashlib.sha256(_size_and_header(path)).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names):
        digest.update(f"{os.path.relpath(file, path)}:".encode() + _size_and_header(file))
    return digest.hexdigest()[:16]


def _size_and_header(file: str) -> bytes:
    out = str(os.path.getsize(file)).encode()
    if file.endswith(".safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            out += f.read(n)
    return out


def load_tensors(path: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``names``) one at a time from a safetensors file."""
    keys = list(safetensors_header(path)[1]) if names is None else names
    return {k: read_tensor(path, k) for k in keys}


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with tied tensors (e.g. ``tie_word_embeddings``) kept once, under
    their first name; safetensors refuses to write shared storage twice. Sharded tensors give
    this rank's block."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = local(tensor)
    return out


def load_checkpoint(model: nn.Module, path: str) -> dict[str, Any]:
    """Load ``path`` into ``model`` in place: a complete mftune file, a directory of complete files
    (loaded together), a Hugging Face directory, a PEFT adapter directory or a distributed
    checkpoint directory (``mftune.checkpoint.sources``).

    Every base (non-LoRA) parameter of the model must be provided with the same shape (a tied
    weight under either of its names); LoRA tensors missing from the checkpoint keep their fresh
    initialisation. Optimizer moments and counters are skipped here (resume restores them).
    Tensors are read one at a time and cast to the parameter's dtype; a sharded parameter
    (DTensor, FSDP2) reads only the block this rank holds. Returns a report: loaded, fresh_lora,
    unused keys.

    A checkpoint lacking base weights (a LoRA run's training checkpoint: adapters, maybe trained
    norms) whose header records its base checkpoint loads that base first (its fingerprint
    checked), then its own tensors over it; the report's ``base`` then names it.
    """
    entries = open_checkpoint(path)
    names = set(model.state_dict())
    if any(LORA_MARK not in n and n not in entries for n in names):
        recorded = checkpoint_header(path).get("base_checkpoint") or {}
        if recorded.get("path"):
            base = load_recorded_base(model, recorded, path)
            report = load_entries(model, entries, path, only=names & entries.keys())
            return {**report, "base": base}
    return load_entries(model, entries, path)


def load_recorded_base(model: nn.Module, recorded: dict, origin: str) -> dict:
    """Load the base checkpoint a LoRA checkpoint's header records (``{"path", "fingerprint"}``),
    refusing a base that is missing or changed; returns its path and fingerprint."""
    path = recorded.get("path") or ""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"checkpoint {origin} holds only the trained tensors and its base checkpoint "
                              f"{path or '(not recorded)'} is not found. Restore the base at that path, or "
                              f"pass a directory holding both the base and this checkpoint.")
    actual = fingerprint(path)
    if recorded.get("fingerprint") and actual != recorded["fingerprint"]:
        raise CheckpointError(f"base checkpoint {path} changed since the run that wrote {origin} started "
                              f"(fingerprint {actual}, recorded {recorded['fingerprint']}). "
                              f"Restore the original base.")
    logger.info("Loading the base checkpoint %s recorded in %s", path, origin)
    load_entries(model, open_checkpoint(path), path)
    return {"path": os.path.abspath(path), "fingerprint": actual}


def load_entries(model: nn.Module, entries: dict[str, Entry], path: str, *,
                 only: set[str] | None = None) -> dict[str, Any]:
    """``load_checkpoint`` from an opened source; ``only``: load just these names (e.g. the
    trainable ones of a resume checkpoint, over an already loaded base) and skip the base check."""
    groups: dict[tuple, list[str]] = {}  # tied names share one group
    state = model.state_dict()
    for name, tensor in state.items():
        if only is None or name in only:
            groups.setdefault(_storage_key(tensor), []).append(name)
    missing = [names[0] for names in groups.values()
               if not entries.keys() & set(names) and (only is not None or LORA_MARK not in names[0])]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} lacks {'tensors' if only is not None else 'base weights'} of this model: "
            f"{shown}. Check that the checkpoint was saved from a model with the same model_config; "
            f"a LoRA-only checkpoint needs its base: put both files in one directory and pass the "
            f"directory.")
    loaded, fresh = [], []
    for names in groups.values():
        target = state[names[0]]
        source = next((n for n in names if n in entries), None)
        if source is None:
            fresh.extend(names)
            continue
        entry = entries[source]
        if entry.shape != tuple(target.shape):
            raise CheckpointError(
                f"checkpoint {entry.origin}: tensor {source} has shape {list(entry.shape)} but the "
                f"model expects {list(target.shape)}. Use a model_config matching the checkpoint.")
        with torch.no_grad():  # only this rank's block is read
            dst = local(target)
            if entry.read_into and entry.known_dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                entry.read_into(local_block(target), dst)  # straight into the parameter: no temporary
            else:
                dst.copy_(entry.read(local_block(target)).to(dst.dtype))
        loaded.append(source)
    unused = sorted(k for k in entries.keys() - set(state)
                    if not k.startswith(OPTIMIZER_PREFIXES) and k not in SCALAR_KEYS)
    lost = [k for k in unused if LORA_MARK in k]
    if lost:
        raise CheckpointError(
            f"checkpoint {path} holds LoRA adapters this model does not have (e.g. {lost[0]}, {len(lost)} in all): "
            f"they would be dropped. Apply the pet_config they were trained with (run_mode finetune, predict "
            f"or eval, the same target_modules), or merge them first with scripts/transform_ckpt_lora.py.")
    if unused and only is None:
        logger.warning("Checkpoint %s has %d tensors this model does not use (e.g. %s)",
                       path, len(unused), unused[0])
    logger.info("Loaded %d tensors from %s%s", len(loaded), path,
                f"; {len(fresh)} LoRA tensors start fresh" if fresh else "")
    return {"loaded": loaded, "fresh_lora": fresh, "unused": unused}


def _storage_key(t: torch.Tensor) -> tuple:
    t = local(t)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
