"""``load_checkpoint``: fill a model (plain, tensor parallel or FSDP2) in place from any checkpoint.

The path's format is recognised by ``mftune.checkpoint.formats``; tensors are read through its
entries one at a time, each rank reading only the block it holds. Optimizer moments and counters
are left to resuming (``mftune.trainer.resume``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from typing import Any

import torch
import xxhash
from torch import nn

from mftune.checkpoint.checksum import content_hash
from mftune.checkpoint.checksum import skipped as checksum_skipped
from mftune.checkpoint.entries import Entry
from mftune.checkpoint.formats import checkpoint_header, huggingface, open_checkpoint, peft_prefix
from mftune.checkpoint.keys import LORA_MARK, is_pet, is_prefix_index, is_prefix_param, is_training_state
from mftune.checkpoint.safetensors_io import checksummed, raw_header
from mftune.errors import CheckpointError
from mftune.parallel.layout import local, local_block, replica

logger = logging.getLogger("mftune")
FINGERPRINT_KIND = "c1:"  # content identities; fingerprints recorded before them have no prefix


def fingerprint(path: str, like: str | None = None) -> str:
    """The identity of a checkpoint's contents, ``"c1:"`` + 32 hex digits. A file whose tensors carry checksums
    is identified by its size and header (which holds the hashes of every byte: cheap, and still content);
    any other file (a Hugging Face download, a .bin) by a hash of its bytes. A directory combines its files'
    names and identities in order: a Hugging Face directory just config.json and the weight files it is read
    from, any other directory every file. Each file's identity is computed once per process and version
    (path, size, mtime). ``like``: a recorded fingerprint; one recorded before content identities (no
    ``"c1:"``: the size and header only) is recomputed that way, so that it still compares."""
    if like and not like.startswith(FINGERPRINT_KIND):
        return _legacy_fingerprint(path)
    if os.path.isfile(path):
        return FINGERPRINT_KIND + file_identity(path)
    digest = xxhash.xxh3_128()
    for file in _identity_files(path):
        digest.update(f"{os.path.relpath(file, path)}:{file_identity(file)}\n".encode())
    return FINGERPRINT_KIND + digest.hexdigest()


def _identity_files(directory: str) -> list[str]:
    if huggingface.matches(directory):  # not tokenizer files, nor a .bin copy beside the safetensors read
        return sorted({os.path.join(directory, "config.json"), *huggingface.find_source(directory).files})
    return sorted(os.path.join(d, f) for d, _, names in os.walk(directory) for f in names)


_IDENTITIES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns): each file's identity, once per process


def _key(file: str) -> tuple[str, int, int]:
    stat = os.stat(file)
    return os.path.abspath(file), stat.st_size, stat.st_mtime_ns


def file_identity(file: str) -> str:
    """The identity ``fingerprint`` gives one file (computed once per process and version of the file)."""
    key = _key(file)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = _header_identity(*key[:2]) or content_hash(file)
    return _IDENTITIES[key]


def _header_identity(file: str, size: int) -> str | None:
    """The identity of a file whose tensors carry checksums (its size and header); None for any other file."""
    try:
        if file.endswith(".safetensors") and checksummed(file):
            return xxhash.xxh3_128_hexdigest(b"header:%d:" % size + raw_header(file))
    except CheckpointError:  # not readable: identified by its bytes (a damaged leftover changes the identity)
        pass
    return None


def hashed_files(path: str) -> list[str]:
    """The files ``fingerprint(path)`` would identify by a hash of all their bytes (no checksums: a Hugging Face
    download, a .bin, a MindSpore .ckpt) and this process has not hashed yet: its costly part."""
    files = [path] if os.path.isfile(path) else _identity_files(path)
    return [f for f in files if _key(f) not in _IDENTITIES and _header_identity(f, os.path.getsize(f)) is None]


def remember_identity(file: str, identity: str) -> None:
    """Take ``identity`` (``file_identity`` of the same file, computed by another process of this machine) as
    ``file``'s, instead of hashing its bytes again."""
    _IDENTITIES[_key(file)] = identity


def _legacy_fingerprint(path: str) -> str:
    """The fingerprint recorded before content identities: sha256 of each file's size and header."""
    if os.path.isfile(path):
        return hashlib.sha256(_size_and_header(path)).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names):
        digest.update(f"{os.path.relpath(file, path)}:".encode() + _size_and_header(file))
    return digest.hexdigest()[:16]


def _size_and_header(file: str) -> bytes:
    out = str(os.path.getsize(file)).encode()
    return out + raw_header(file) if file.endswith(".safetensors") else out


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


def load_checkpoint(model: nn.Module, path: str, src_strategy: str = "", base: str = "") -> dict[str, Any]:
    """Load ``path`` into ``model`` in place: a complete mftune file, a directory of complete files
    (loaded together), a Hugging Face directory, a PEFT adapter directory, a distributed
    checkpoint directory, or MindSpore .ckpt checkpoints (a file, a directory of them, or rank_*/
    folders of them with the ``src_strategy`` they were saved with) (``mftune.checkpoint.formats``).

    Every base (non-LoRA) parameter of the model must be provided with the same shape (a tied
    weight under either of its names); LoRA tensors missing from the checkpoint keep their fresh
    initialisation. Optimizer moments and counters are skipped here (resume restores them).
    Tensors are read one at a time and cast to the parameter's dtype; a sharded parameter
    (DTensor, FSDP2) reads only the block this rank holds. Returns a report: loaded, fresh_lora,
    unused keys.

    A checkpoint lacking base weights (a LoRA run's training checkpoint: adapters, maybe trained
    norms) whose header records its base checkpoint loads that base first (its fingerprint
    checked), then its own tensors over it; the report's ``base`` then names it. ``base`` (a run's
    ``pretrained_model_dir``) replaces the recorded base, or gives one to a checkpoint recording none (a
    PEFT adapter); a recorded base of other contents is named in a warning.
    """
    entries = peft_prefix.in_model_positions(open_checkpoint(path, src_strategy), model)
    names = set(model.state_dict())
    if lacks_base(model, entries):
        recorded = checkpoint_header(path).get("base_checkpoint") or {}
        given = base and os.path.abspath(base) != os.path.abspath(path)
        if given or recorded.get("path"):
            found = load_recorded_base(model, recorded, path, base if given else "", strict=False)
            return {**load_entries(model, entries, path, only=names & entries.keys()), "base": found}
    return load_entries(model, entries, path)


def lacks_base(model: nn.Module, entries: dict[str, Entry]) -> bool:
    """Whether ``entries`` miss base (non-PET) weights of ``model``: a checkpoint of trained tensors only, loaded
    over a base."""
    return any(not is_pet(n) and n not in entries for n in model.state_dict())


def load_recorded_base(model: nn.Module, recorded: dict, origin: str, base: str = "", strict: bool = True) -> dict:
    """Load the base of a checkpoint ``origin`` that holds only trained tensors: ``base`` when given (a run's
    pretrained_model_dir), else the one its header records (``recorded``: ``{"path", "fingerprint"}``).
    A base whose contents differ from the recorded fingerprint is refused when ``strict`` (a resumed run, or
    the recorded base itself: it changed), else named in a warning (the adapters then sit on another model).
    Returns its path and fingerprint."""
    path = base or recorded.get("path") or ""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"checkpoint {origin} holds only the trained tensors and its base checkpoint "
                              f"{path or '(not recorded)'} is not found. Restore the base at that path, or "
                              f"pass a directory holding both the base and this checkpoint.")
    expected = recorded.get("fingerprint")
    actual = fingerprint(path, like=expected)
    if expected and actual != expected:
        why = (f"checkpoint {origin} was trained over the base {recorded.get('path')} (fingerprint {expected}), "
               f"and {path} holds other contents (fingerprint {actual})")
        if strict or not base:
            fix = "Restore the original base." if not base else "Resume over the original base, or start a new run."
            raise CheckpointError(f"{why}. {fix}")
        logger.warning("%s; it is applied to %s, as pretrained_model_dir says", why, path)
    logger.info("Loading the base checkpoint %s under %s", path, origin)
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
               if not entries.keys() & set(names) and (only is not None or not is_pet(names[0]))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} lacks {'tensors' if only is not None else 'base weights'} of this model: "
            f"{shown}. Check that the checkpoint was saved from a model with the same model_config; "
            f"a LoRA-only checkpoint needs its base: put both files in one directory and pass the "
            f"directory.")
    prefix = [n for n in state if is_prefix_param(n)]
    partial = [n for n in prefix if n not in entries] if any(n in entries for n in prefix) else []
    if partial:  # a trained table beside a random projection (or the reverse) means nothing
        raise CheckpointError(
            f"checkpoint {path} holds part of this model's prefix but not {partial[0]} ({len(partial)} tensor(s) "
            f"missing): it was trained with another pet_config (e.g. prefix_projection). Apply the pet_config it "
            f"was trained with.")
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
        copy, copies = replica(target)  # tensors held whole by several ranks: each checked by one of them
        with torch.no_grad(), checksum_skipped(zlib.crc32(names[0].encode()) % copies != copy):  # own block only
            dst = local(target)
            if entry.read_into and entry.known_dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                entry.read_into(local_block(target), dst)  # straight into the parameter: no temporary
            else:
                dst.copy_(entry.read(local_block(target)).to(dst.dtype))
        loaded.append(source)
    unused = sorted(k for k in entries.keys() - set(state) if not is_training_state(k))
    lost = [k for k in unused if is_pet(k) and not is_prefix_index(k)]
    if lost:
        raise CheckpointError(
            f"checkpoint {path} holds {'LoRA adapters' if LORA_MARK in lost[0] else 'prefix tensors'} this model "
            f"does not have (e.g. {lost[0]}, {len(lost)} in all): they would be dropped. Apply the pet_config they "
            f"were trained with (the same pet_type and target_modules, in any run_mode), or merge LoRA first with "
            f"scripts/transform_ckpt_lora.py.")
    unused = [k for k in unused if not is_prefix_index(k)]  # MindFormers' arange(P) index: no parameter here
    if unused and only is None:
        logger.warning("Checkpoint %s has %d tensors this model does not use (e.g. %s)",
                       path, len(unused), unused[0])
    logger.info("Loaded %d tensors from %s%s", len(loaded), path,
                f"; {len(fresh)} PET tensors start fresh" if fresh else "")
    return {"loaded": loaded, "fresh_lora": fresh, "unused": unused}


def _storage_key(t: torch.Tensor) -> tuple:
    t = local(t)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
