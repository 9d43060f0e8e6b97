"""A training job restarted by the launcher continues from its own last complete checkpoint.

``scripts/launcher.sh --max_restarts N`` (or the YAML key ``max_restarts``) lets torchrun's elastic agent
restart every rank of a job whose rank died or hung; each attempt's workers see
``TORCHELASTIC_RESTART_COUNT`` (0 for the first). A restarted ``train`` / ``finetune`` run looks in its
CheckpointMonitor folder (``<directory or output_dir>/checkpoint/rank_*``) for the newest step that this job
saved (files written since the launcher started it, ``MFTUNE_JOB_START``: an earlier job's checkpoints in the
same folder are never taken) and that every rank holds intact (``resume.damage``), and resumes from it
exactly as ``--resume_training <that file> --load_checkpoint <that folder>`` would: trainable weights,
optimizer, schedule, data position and RNG from the checkpoint, the frozen base from the base checkpoint it
records. With none saved yet, the attempt starts again as the first one did. The resumed loss curve is the
uninterrupted one (tests/e2e/test_restart.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os

from mftune.checkpoint.safetensors_io import load_tensors
from mftune.config.schema import MFConfig
from mftune.errors import ConfigError
from mftune.trainer.resume import newest_intact, saved_steps

logger = logging.getLogger("mftune")
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun for every worker: 0, 1, 2 ...
JOB_START = "MFTUNE_JOB_START"  # set by the launcher: when the job started (seconds since the epoch)


def restart_config(cfg: MFConfig) -> MFConfig:
    """``cfg`` for this attempt: unchanged for a first attempt (or one with nothing saved yet), else set to
    resume from this job's newest intact checkpoint (module docstring). Logged either way."""
    _check_settings(cfg)
    attempt = _env_int(RESTART_COUNT)
    if attempt <= 0 or cfg.run_mode not in ("train", "finetune"):
        return cfg
    which = f"restart {attempt} of {_env_int('TORCHELASTIC_MAX_RESTARTS') or '?'}"
    ckpt_cb = cfg.callback("CheckpointMonitor")
    root = os.path.join(os.path.abspath(ckpt_cb.directory or cfg.output_dir), "checkpoint") if ckpt_cb else ""
    files = own_checkpoint(root, job_start(), _env_int("WORLD_SIZE") or 1) if root else None
    if files is None:
        logger.warning("%s: no checkpoint of this job in %s yet; starting again from the beginning", which,
                       root or "(no CheckpointMonitor callback)")
        return cfg
    step = int(load_tensors(files[0], ["global_step"])["global_step"])
    logger.warning("%s: resuming from %s (step %d)", which, files[0], step)
    return dataclasses.replace(cfg, load_checkpoint=root, resume_training=os.path.basename(files[0]),
                               auto_trans_ckpt=False)  # saved in this very layout: nothing to transform


def own_checkpoint(root: str, since: float, world_size: int) -> list[str] | None:
    """Per rank (``root/rank_0`` .. ``rank_{world_size-1}``), the file of the newest (epoch, step) that every
    rank saved at or after ``since`` and holds intact; None when there is none. Damaged newer steps are skipped
    with a warning naming them."""
    per_rank = saved_steps([os.path.join(root, f"rank_{rank}") for rank in range(world_size)], since)
    files, skipped = newest_intact(per_rank)
    if skipped:
        logger.warning("restart: skipping the damaged checkpoint(s) %s", "; ".join(skipped))
    return files


def job_start() -> float:
    """When this job started: the launcher's MFTUNE_JOB_START, else the start of the parent process (torchrun's
    agent, Linux /proc), else 0 (every checkpoint in the folder counts)."""
    if os.environ.get(JOB_START):
        return float(os.environ[JOB_START])
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def _check_settings(cfg: MFConfig) -> None:
    """max_restarts / heartbeat_timeout: whole numbers >= 0; without the launcher they have no effect (said once)."""
    errors = [f"{key}={value} is invalid: must be >= 0. Give e.g. {key}: {default}."
              for key, value, default in (("max_restarts", cfg.max_restarts, 2),
                                          ("heartbeat_timeout", cfg.heartbeat_timeout, 600)) if value < 0]
    if errors:
        raise ConfigError(errors)
    if cfg.max_restarts > 0 and JOB_START not in os.environ and _env_int("RANK") == 0:
        logger.warning("max_restarts=%d has no effect here: restarts need the launcher (bash scripts/launcher.sh "
                       "\"run_finetune.py ...\" N), whose torchrun restarts a job whose rank died or hung",
                       cfg.max_restarts)


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0
