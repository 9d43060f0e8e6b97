"""Where a run's weights come from: a resumed run, a checkpoint, or random initialisation.

``plan_weights`` is the one decision (from ``load_checkpoint``, ``resume_training`` and
``auto_trans_ckpt``); ``load_weights`` carries it out on a model that is built, parallelized and
materialised: with ``auto_trans_ckpt`` the checkpoint is first written in this run's layout (every
rank takes part), then each rank reads only its blocks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist
from torch import nn

from mftune.checkpoint import slora_adapters
from mftune.checkpoint.formats import checkpoint_header, open_checkpoint
from mftune.checkpoint.formats.distributed import distributed_entries
from mftune.checkpoint.keys import LORA_B, is_prefix_param
from mftune.checkpoint.load import (FINGERPRINT_KIND, file_identity, fingerprint, hashed_files, lacks_base,
                                    load_checkpoint, remember_identity)
from mftune.checkpoint.recorded_config import check_recorded_architecture
from mftune.checkpoint.transform import auto_transform
from mftune.config.schema import MFConfig
from mftune.errors import CheckpointError
from mftune.fileio import human_bytes
from mftune.parallel.gather import distributed, gather_ints, host_id
from mftune.parallel.layout import fill_from_full
from mftune.parallel.mesh import ParallelContext
from mftune.pet import init_base_factors, init_from_weights, init_pet_weights
from mftune.pet.config import is_slora
from mftune.trainer.resume import ResumePoint, load_base

logger = logging.getLogger("mftune")


@dataclass(frozen=True)
class WeightsPlan:
    """``source``: "resume" (trained tensors from ``resume``'s files, frozen ones from its base),
    "checkpoint" (everything from ``path``) or "init" (random, drawn as one process would)."""

    source: Literal["resume", "checkpoint", "init"]
    path: str = ""  # load_checkpoint
    transform: bool = False  # auto_trans_ckpt: write ``path`` in this run's layout, then read that
    resume: ResumePoint | None = None


@dataclass(frozen=True)
class LoadedWeights:
    base_checkpoint: dict  # {"path", "fingerprint"} of the base weights ({} when random)
    resume: ResumePoint | None  # the resume point, its entries read from the transformed copy if any


def plan_weights(cfg: MFConfig, point: ResumePoint | None) -> WeightsPlan:
    """The decision, from the configuration alone (``point``: the resume point when resuming)."""
    if point is not None:
        return WeightsPlan("resume", cfg.load_checkpoint, cfg.auto_trans_ckpt, point)
    if cfg.load_checkpoint:
        return WeightsPlan("checkpoint", cfg.load_checkpoint, cfg.auto_trans_ckpt)
    return WeightsPlan("init")


def load_weights(model: nn.Module, plan: WeightsPlan, cfg: MFConfig, ctx: ParallelContext) -> LoadedWeights:
    """Fill the materialised ``model`` as ``plan`` says; returns what the run's checkpoints record."""
    share_hashing(fingerprinted(model, plan, cfg))
    if plan.source == "init":
        model.init_weights(fill_from_full)
        init_base_factors(model, (), fill_from_full)  # PiSSA / OLoRA adapters from the random base (DoRA: drawn)
        _load_slora(model, cfg)
        named = cfg.model.model_config.get("checkpoint_name_or_path")
        if named:  # MindFormers would download that model's weights; mftune reads only load_checkpoint
            logger.warning("model.model_config.checkpoint_name_or_path=%s is not loaded: mftune downloads nothing "
                           "and reads weights from load_checkpoint only (empty: random initialisation)", named)
        if cfg.run_mode != "train" or cfg.model.model_config.get("pet_config"):
            logger.warning("load_checkpoint is empty: %s with randomly initialised weights%s", cfg.run_mode,
                           " (the pet_config's adapters train over a random, frozen base)"
                           if cfg.model.model_config.get("pet_config") else "")
        return LoadedWeights({}, None)
    model.tie_weights()
    init_pet_weights(model, fill_from_full)  # PET parameters a checkpoint lacks start fresh
    if plan.source == "resume":  # frozen weights from the run's base; trained ones come with the optimizer state
        point = plan.resume
        base = load_base(model, point, cfg.pretrained_model_dir) or point.base_checkpoint
        init_base_factors(model, (), fill_from_full)  # PiSSA / OLoRA's A0, B0 (the trained A, B come next)
        if plan.transform:  # counters and RNG states still come from the saved files
            point = dataclasses.replace(point, entries=distributed_entries(*_transform(cfg, ctx, point.files)))
        return LoadedWeights(base, point)
    check_recorded_architecture(plan.path, model.config)  # theta, rope scaling, ties, heads: never silent
    # every base tensor must be in the checkpoint (or in the base its header records, for a LoRA-only one)
    # pretrained_model_dir is the base of a checkpoint that holds only adapters (a PEFT adapter, a LoRA run's)
    base = cfg.pretrained_model_dir
    report = (load_checkpoint(model, _transform(cfg, ctx)[0], base=base) if plan.transform else
              load_checkpoint(model, plan.path, src_strategy=cfg.src_strategy_path_or_dir, base=base))
    init_from_weights(model, report["loaded"], fill_from_full)  # DoRA magnitudes, PiSSA / OLoRA factors not loaded
    _load_slora(model, cfg)
    prefix = [n for n in report["fresh_lora"] if is_prefix_param(n)]
    if prefix and cfg.run_mode in ("eval", "predict"):  # a random prefix is not the base model, unlike B = 0
        raise CheckpointError(f"load_checkpoint={plan.path} holds no prefix ({prefix[0]}, {len(prefix)} tensor(s)) "
                              f"for pet_config pet_type {model.config.pet_config.get('pet_type')}: the {cfg.run_mode} "
                              f"would use a random one. Pass the checkpoint of the prefix run (it records its base), "
                              f"or remove pet_config to {cfg.run_mode} the base model.")
    fresh = [n for n in report["fresh_lora"] if n.endswith(LORA_B)]  # A0/B0, S-LoRA stacks: filled from elsewhere
    if fresh and cfg.run_mode in ("eval", "predict"):
        logger.warning("%d LoRA B factors are not in load_checkpoint=%s: they start at 0, so the %s uses the base "
                       "model alone there", len(fresh), plan.path, cfg.run_mode)
    return LoadedWeights(report.get("base") or {"path": os.path.abspath(plan.path),
                                                "fingerprint": fingerprint(plan.path)}, None)


def _load_slora(model: nn.Module, cfg: MFConfig) -> None:
    """pet_type slora: its adapters' factors into their slots, after the base (mftune.checkpoint.slora_adapters)."""
    pet_config = model.config.pet_config
    if is_slora(pet_config):
        slora_adapters.load(model, pet_config["adapter_path"], fill_from_full)


def _transform(cfg: MFConfig, ctx: ParallelContext, files: list[str] | None = None) -> tuple[str, list[str]]:
    """``auto_trans_ckpt``: ``load_checkpoint`` written in this run's layout (``files``: the rank files
    of a resume point); returns the folder and this layout's rank files."""
    return auto_transform(cfg.load_checkpoint, os.path.abspath(cfg.output_dir), rank=ctx.rank,
                          world_size=ctx.world_size, process_num=cfg.transform_process_num,
                          src_strategy=cfg.src_strategy_path_or_dir, files=files)


def fingerprinted(model: nn.Module, plan: WeightsPlan, cfg: MFConfig) -> list[str]:
    """The checkpoint whose contents this run fingerprints ([] or one path): a complete load_checkpoint itself;
    under one of trained tensors only (a LoRA run's, a PEFT adapter) or a resume point, the base loaded first
    (pretrained_model_dir, else the recorded one), unless its recorded fingerprint is an old size + header one.
    A checkpoint that cannot be read gives []: the load names the problem."""
    try:
        if plan.source == "resume":
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            if all(n in plan.resume.entries for n in frozen):
                return []
            recorded = plan.resume.base_checkpoint or {}
        elif plan.source == "checkpoint":
            if not lacks_base(model, open_checkpoint(plan.path, cfg.src_strategy_path_or_dir)):
                return [plan.path]
            recorded = checkpoint_header(plan.path).get("base_checkpoint") or {}
        else:
            return []
    except (OSError, CheckpointError):
        return []
    expected = str(recorded.get("fingerprint") or "")
    path = cfg.pretrained_model_dir or recorded.get("path") or ""
    if expected and not expected.startswith(FINGERPRINT_KIND):  # compared by the old size + header rule
        return []
    return [path] if path and os.path.exists(path) else []


def share_hashing(paths: list[str]) -> None:
    """Hash the files of ``paths`` that carry no checksums (a Hugging Face download: its fingerprint is a hash of
    every byte) once per machine: the machine's first rank reads them, the others take its result, instead of
    every rank reading the whole base again (2-4 s per rank for 7B). A collective: every rank calls it. When the
    ranks' lists differ, or the first rank cannot read a file, each rank hashes for itself (and meets the error
    itself)."""
    if not distributed():
        return
    found: set[str] = set()
    for path in paths:
        try:
            found.update(hashed_files(path))
        except (OSError, CheckpointError):  # the load names the problem
            pass
    files = sorted(found)
    rows = gather_ints([host_id(), len(files)])
    if not files or len({n for _, n in rows}) != 1:
        return
    leader = [h for h, _ in rows].index(host_id())  # this machine's first rank
    mine = [0] * (1 + 2 * len(files))  # [read, then each identity (128 bits) as two int64]
    if dist.get_rank() == leader:
        try:
            start = time.perf_counter()
            identities = [file_identity(f) for f in files]
            mine = [1] + [int(h[i:i + 16], 16) - 2**63 for h in identities for i in (0, 16)]
            logger.info("Fingerprinted %d file(s) without checksums (%s) by their bytes in %.1f s, for this "
                        "machine's %d rank(s)", len(files), human_bytes(sum(os.path.getsize(f) for f in files)),
                        time.perf_counter() - start, [h for h, _ in rows].count(host_id()))
        except (OSError, CheckpointError):
            pass
    got = gather_ints(mine)[leader]
    if got[0] == 1:
        for k, f in enumerate(files):
            remember_identity(f, "".join(f"{v + 2**63:016x}" for v in got[1 + 2 * k:3 + 2 * k]))
