"""The files a run writes into ``output_dir``, and moving an earlier run's aside before a new run writes them.

A run whose ``output_dir`` holds an earlier run's files (a finished run, a failed one, the run a resumed run
continues) first moves each file it is about to write to ``<name>.1`` (an existing ``.1`` to ``.2`` ... up to
``.5``; the oldest beyond is removed: ``fileio.rotate``, logrotate's names), so that no run, a failing one
included, overwrites what another wrote: rank 0 the shared files of its run mode, every rank its own
``log/rank_<r>/info.log``. A resumed run starts its own metrics.jsonl (its steps continue the global count).
Checkpoints are never moved: CheckpointMonitor picks a free file prefix instead (MindSpore's rule).
"""
from __future__ import annotations

import logging
import os

from mftune.fileio import rotate
from mftune.log import log_file

logger = logging.getLogger("mftune")

RESOLVED_CONFIG = "resolved_config.yaml"
METRICS, LOSS_CURVE, RUN_SUMMARY = "metrics.jsonl", "loss_curve.png", "run_summary.json"
EVAL_METRICS, EVAL_RESULTS = "eval_metrics.jsonl", "eval_results.json"  # trainer/evaluate.py writes these
PREDICT_RESULTS = "predict_results.jsonl"
KEEP = 5  # earlier runs' versions kept of each file: .1 (the newest) .. .5


def run_outputs(run_mode: str, only_save_strategy: bool = False) -> list[str]:
    """The shared files (rank 0 writes them) that a run of ``run_mode`` writes into output_dir."""
    names = [RESOLVED_CONFIG]
    if run_mode in ("train", "finetune") and not only_save_strategy:
        names += [METRICS, LOSS_CURVE, RUN_SUMMARY, EVAL_METRICS]
    elif run_mode == "eval":
        names.append(EVAL_RESULTS)
    elif run_mode == "predict":
        names.append(PREDICT_RESULTS)
    return names


def set_aside_previous_run(output_dir: str, rank: int, shared: list[str]) -> list[str]:
    """Move an earlier run's versions of ``shared`` (names in output_dir; rank 0 passes them, other ranks
    none) and of this rank's info.log to ``.1``; returns what was moved, relative to output_dir. Called
    before logging opens info.log, so it logs nothing itself: ``note_set_aside`` says it afterwards."""
    paths = [os.path.join(output_dir, name) for name in shared] + [log_file(output_dir, rank)]
    return [os.path.relpath(path, output_dir) for path in paths if rotate(path, KEEP)]


def note_set_aside(output_dir: str, moved: list[str]) -> None:
    """One log line (rank 0: on the console too) naming the files ``set_aside_previous_run`` moved."""
    if moved:
        logger.info("A previous run's files in %s were moved to *.1 (older ones to .2 .. .%d): %s",
                    output_dir, KEEP, ", ".join(moved))
