"""``--resume_training``: continue a run from one of its training checkpoints (reference §9).

``load_checkpoint`` names the checkpoint: a training checkpoint file, or the run's
``checkpoint/`` directory (``rank_{r}/`` folders). ``resume_training: True`` takes, in a
directory, the newest (epoch, step) that every rank folder holds intact: a step whose file is
truncated or damaged in some folder (its size differs from what meta.json recorded for it, or its
safetensors header does not describe its bytes) is skipped, with a warning naming it and the step
used instead. A file name (e.g. ``llama2_7b_lora_rank_0-2_500.safetensors``, ``.safetensors``
optional) takes that step in every folder, with ``_rank_k`` rewritten to each folder's rank; a damaged
one is an error naming the file. Folders whose file names carry no step (a transformed checkpoint)
resume from each folder's meta.json file. A resume point with no step left to train (at or past
``epochs`` x steps per epoch) is an error (``check_steps_left``).

Restored: trainable parameters, AdamW moments and step count, the LR schedule position (global
step), the data position (epoch and step within it: the order of the samples does not depend on
the layout, so a run resumed with another data_parallel continues with the same samples), the
loss scale and, in the same layout, each rank's RNG state. Frozen base weights come from the base
checkpoint recorded in the file's header (checked by fingerprint). The checkpoint's layout may
differ from this run's: every tensor is read as the blocks this rank holds.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from mftune.checkpoint.checksum import ChecksumMismatch
from mftune.checkpoint.entries import Entry, safetensors_entries
from mftune.checkpoint.formats import MINDSPORE_FORMATS, recognise
from mftune.checkpoint.formats.distributed import distributed_entries, rank_dirs, rank_files
from mftune.checkpoint.keys import moment_names
from mftune.checkpoint.load import load_entries, load_recorded_base
from mftune.checkpoint.safetensors_io import (load_tensors, read_metadata, read_tensor, safetensors_header,
                                              verify_tensors)
from mftune.errors import CheckpointError, ConfigError
from mftune.parallel.layout import local, local_block

logger = logging.getLogger("mftune")
STEP_IN_NAME = re.compile(r"-(\d+)_(\d+)\.safetensors$")
VERIFY_ON_RESUME_BYTES = 256 * 2**20  # damage() reads files up to this size whole to check their checksums


@dataclass(frozen=True)
class ResumePoint:
    files: list[str]  # one per saved rank (one for a single-process checkpoint)
    entries: dict[str, Entry]
    epoch: int  # 1-based epoch of the last completed step
    step_in_epoch: int  # that step's number within its epoch (1-based)
    global_step: int
    optimizer_step: int
    loss_scale: float
    loss_scale_good_steps: int  # 0 for checkpoints that do not record it
    global_batch_size: int
    base_checkpoint: dict
    layout: dict | None  # world_size, data_parallel, model_parallel of the saving run (if recorded)


def find_resume_point(path: str, resume_training: bool | str) -> ResumePoint:
    """Resolve ``load_checkpoint`` + ``resume_training`` to the files of one saved step."""
    if not path:
        raise CheckpointError("resume_training is set but load_checkpoint is empty. Pass the checkpoint "
                              "file, or the run's checkpoint/ directory, as --load_checkpoint.")
    name = resume_training if isinstance(resume_training, str) else None
    if os.path.exists(path) and recognise(path) in MINDSPORE_FORMATS:
        raise CheckpointError(f"load_checkpoint={path} is a MindSpore checkpoint: resume_training continues "
                              f"mftune's own training checkpoints. Start from its weights without "
                              f"--resume_training (the optimizer state and data position start fresh).")
    if os.path.isfile(path):
        if name:
            logger.warning("resume_training=%s ignored: load_checkpoint is the file %s", name, path)
        _refuse_damaged([path], "load_checkpoint")
        files, entries = [path], safetensors_entries(path)
    elif rank_dirs(path):
        files = _named_files(path, name) if name else _newest_common(path)
        entries = distributed_entries(path, files)
    else:
        raise CheckpointError(f"load_checkpoint={path} is neither a training checkpoint file nor a "
                              f"checkpoint directory with rank_*/ folders, which resume_training needs.")
    names = ["epoch_num", "step_num", "global_step", "loss_scale", "global_batch_size"]
    if not set(names) <= entries.keys():
        raise CheckpointError(f"checkpoint {files[0]} has no training counters (epoch_num, step_num, ...): "
                              f"it is not a training checkpoint of output/checkpoint/ and cannot be resumed.")
    optional = [k for k in ("optimizer_step", "loss_scale_good_steps") if k in entries]
    counters = load_tensors(files[0], names + optional)
    meta = read_metadata(files[0])
    return ResumePoint(files, entries, int(counters["epoch_num"]), int(counters["step_num"]),
                       int(counters["global_step"]),
                       int(counters.get("optimizer_step", counters["global_step"])),
                       float(counters["loss_scale"]), int(counters.get("loss_scale_good_steps", 0)),
                       int(counters["global_batch_size"]),
                       meta.get("base_checkpoint") or {}, meta.get("layout"))


def _named_files(root: str, name: str) -> list[str]:
    name = name if name.endswith(".safetensors") else f"{name}.safetensors"
    files = []
    for d in rank_dirs(root):
        rank = os.path.basename(d)[5:]
        file = os.path.join(d, re.sub(r"_rank_\d+", f"_rank_{rank}", os.path.basename(name)))
        if not os.path.isfile(file):
            raise CheckpointError(f"resume_training={name}: {file} does not exist. Give a checkpoint name "
                                  f"saved by every rank, or resume_training: True for the newest.")
        files.append(file)
    _refuse_damaged(files, f"resume_training={name}")
    return files


def _refuse_damaged(files: list[str], asked: str) -> None:
    for file in files:
        why = damage(file)
        if why:
            raise CheckpointError(f"{asked}: checkpoint {file} cannot be resumed from: {why}. Name another "
                                  f"checkpoint, or use resume_training: True for the newest intact one.")


def _newest_common(root: str) -> list[str]:
    """Per rank, the file of the newest (epoch, step) that every rank folder holds intact; newer steps
    with a damaged file in some folder are skipped with a warning naming them and the step used."""
    per_rank = saved_steps(rank_dirs(root))
    if per_rank and not any(per_rank):  # no <prefix>-<epoch>_<step> names, e.g. a transformed checkpoint
        return rank_files(root)
    if not per_rank or not set.intersection(*(set(s) for s in per_rank)):
        raise CheckpointError(f"checkpoint directory {root}: no step is saved by every rank folder. "
                              f"Name a checkpoint file with resume_training, or start a new run.")
    files, skipped = newest_intact(per_rank)
    if files is None:
        raise CheckpointError(f"checkpoint directory {root}: every saved step has a damaged file: "
                              f"{'; '.join(skipped)}. Restore the files, or start a new run.")
    if skipped:
        step = STEP_IN_NAME.search(files[0])
        logger.warning("resume_training: skipped the damaged checkpoint(s) %s; resuming from %s (epoch %s, step %s), "
                       "the newest intact one", "; ".join(skipped), files[0], step.group(1), step.group(2))
    return files


def saved_steps(folders: list[str], since: float = 0.0) -> list[dict[tuple[int, int], str]]:
    """Per folder, ``{(epoch, step): file}`` of its ``<prefix>-<epoch>_<step>.safetensors`` files modified at or
    after ``since`` (the newest file of a step wins: a later prefix)."""
    per_rank = []
    for folder in folders:
        steps: dict[tuple[int, int], str] = {}
        for file in sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")), key=os.path.getmtime):
            match = STEP_IN_NAME.search(file)
            if match and os.path.getmtime(file) >= since:
                steps[(int(match.group(1)), int(match.group(2)))] = file
        per_rank.append(steps)
    return per_rank


def newest_intact(per_rank: list[dict[tuple[int, int], str]]) -> tuple[list[str] | None, list[str]]:
    """(per rank, the file of the newest step every rank holds intact, or None; the damaged files of the newer
    steps skipped, each with why)."""
    skipped: list[str] = []
    common = set.intersection(*(set(s) for s in per_rank)) if per_rank else set()
    for step in sorted(common, reverse=True):
        files = [steps[step] for steps in per_rank]
        damaged = [f"{file} ({why})" for file in files if (why := damage(file))]
        if not damaged:
            return files, skipped
        skipped += damaged
    return None, skipped


def damage(file: str) -> str | None:
    """Why ``file`` cannot be resumed from, None when it is intact: its size differs from what its folder's
    meta.json recorded for it (the newest save), or its safetensors header does not describe its bytes
    (truncated, damaged or not a safetensors file), or (files up to VERIFY_ON_RESUME_BYTES) its bytes do not
    match their checksums; larger files are checked as they are read."""
    size, recorded = os.path.getsize(file), _recorded_size(file)
    if recorded is not None and size != recorded:
        return f"it has {size} bytes but meta.json recorded {recorded}: truncated or replaced"
    try:
        safetensors_header(file)
    except CheckpointError:
        return f"its {size} bytes are not a complete safetensors file: truncated or damaged"
    try:  # a LoRA run's checkpoint (MBs): every byte checked against its checksums, cheaply
        if size <= VERIFY_ON_RESUME_BYTES:
            verify_tensors(file)
    except CheckpointError as exc:
        return f"{exc.detail}: damaged" if isinstance(exc, ChecksumMismatch) else "its checksum record is damaged"
    return None


def _recorded_size(file: str) -> int | None:
    """The size meta.json beside ``file`` recorded when it names ``file`` (None otherwise or unreadable)."""
    try:
        with open(os.path.join(os.path.dirname(file), "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("last_ckpt_file") != os.path.basename(file):
        return None
    size = meta.get("file_size")
    return size if isinstance(size, int) else None


def check_steps_left(point: ResumePoint, epochs: int, steps_per_epoch: int) -> None:
    """ConfigError when the resume point leaves no step to train: at or past the end of ``epochs`` epochs
    of ``steps_per_epoch`` steps (the run would end at once, having trained nothing)."""
    left = max(0, steps_per_epoch - point.step_in_epoch) if point.epoch <= epochs else 0
    left += max(0, epochs - point.epoch) * steps_per_epoch
    if left:
        return
    needed = point.epoch + (point.step_in_epoch >= steps_per_epoch)
    raise ConfigError([f"runner_config.epochs={epochs} is invalid for this resume: checkpoint {point.files[0]} is "
                       f"at epoch {point.epoch}, step {point.step_in_epoch} (global step {point.global_step}), at "
                       f"or past the end of this run ({epochs} epoch(s) x {steps_per_epoch} steps = "
                       f"{epochs * steps_per_epoch} steps): nothing is left to train. Raise --epochs (e.g. "
                       f"--epochs {max(needed, epochs + 1)}) to train on from it, or start a new run without "
                       f"--resume_training."])


def load_base(model: nn.Module, point: ResumePoint, base: str = "") -> dict:
    """Frozen weights for a resumed run whose checkpoint holds only what was trained: the base
    checkpoint recorded in the header, or ``base`` (pretrained_model_dir: the same contents elsewhere),
    its fingerprint checked either way (a resumed run continues on the same model)."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen or all(n in point.entries for n in frozen):
        return {}
    return load_recorded_base(model, point.base_checkpoint, point.files[0], base)


def same_layout(point: ResumePoint, layout: dict) -> bool:
    """Whether this run has the saving run's layout (then each rank's RNG state is restored):
    one file per rank and, when the checkpoint records it, the same world size, data_parallel and
    model_parallel."""
    return len(point.files) == layout["world_size"] and (point.layout is None or point.layout == layout)


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, point: ResumePoint, rank: int,
            same_layout: bool) -> None:
    """Trainable parameters, AdamW state and (same layout) this rank's RNG state."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    load_entries(model, point.entries, point.files[0], only=set(trainable))
    missing = [n for n in trainable if moment_names(n)[0] not in point.entries]
    if missing:
        raise CheckpointError(f"checkpoint {point.files[0]} has no optimizer moments for {missing[0]}: "
                              f"it cannot be resumed exactly. Start a new run from it with "
                              f"resume_training: False instead.")
    for name, param in trainable.items():
        state = optimizer.state[param]
        state["step"] = torch.tensor(float(point.optimizer_step), dtype=torch.float32)
        for key, stored in zip(("exp_avg", "exp_avg_sq"), moment_names(name)):
            moment = torch.zeros_like(param, memory_format=torch.preserve_format)
            local(moment).copy_(point.entries[stored].read(local_block(param)))
            state[key] = moment
    if same_layout:  # from the saved file itself (an auto_trans_ckpt transform drops RNG states)
        if "rng_state" in safetensors_header(point.files[rank])[1]:
            torch.set_rng_state(read_tensor(point.files[rank], "rng_state"))
        else:
            logger.info("Checkpoint %s holds no RNG state (e.g. a transformed checkpoint): dropout "
                        "masks will differ from the uninterrupted run", point.files[rank])
    else:
        logger.info("Resumed in another layout: RNG states (dropout) are not restored")
