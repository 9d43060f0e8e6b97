"""MFLossMonitor: MindFormers' two log lines per step (reference §8.1), metrics.jsonl, loss curve,
the progress bar and the end-of-run report."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import resource
import sys
from dataclasses import dataclass

import torch

from mftune.fileio import atomic_open, rotate
from mftune.trainer.outputs import KEEP, LOSS_CURVE, METRICS, RESOLVED_CONFIG, RUN_SUMMARY

logger = logging.getLogger("mftune")


@dataclass
class StepStats:
    """What one optimizer step produced; ``step`` is the global step counted from 1."""

    step: int
    epoch: int  # 1-based
    step_in_epoch: int  # 1-based
    loss: float
    lr: float
    step_seconds: float
    global_norm: float
    overflow: bool
    loss_scale: float
    tokens: int  # input tokens in the global batch
    real_tokens: int  # of them, not padding (pad_token_id)
    samples: int  # samples in the global batch


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LossMonitor:
    """Logs every ``per_print_times`` steps in MindFormers' format and appends to metrics.jsonl.

    Line 1 (sink mode): ``{ Epoch:[  1/  2], step:[    2/ 3250], loss: 1.234, per_step_time: 3141ms,
    lr: [2.05e-07], overflow cond: False, loss_scale: 1.0, global_norm: [0.87]`` (non-sink mode
    prints ``loss:[cur/epoch mean]``), then mftune's ``, tokens/s: ..., real_tokens/s: ..., peak_mem: ...MB``
    (tokens/s counts every input position; real_tokens/s only those that are not padding).
    Line 2: ``  12.5% |█████     ...| 10.12345 samples/s/p  0:01:23 }``.
    """

    def __init__(self, metrics_path: str | None, *, epochs: int, steps_per_epoch: int, world_size: int,
                 device: torch.device, per_print_times: int = 1, sink_mode: bool = True,
                 initial_step: int = 0):
        self.metrics_path = metrics_path
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.world_size, self.device = world_size, device
        self.per_print_times, self.sink_mode = max(1, per_print_times), sink_mode
        self.initial_step = initial_step
        self._epoch_losses: list[float] = []
        self._epoch = 0
        if metrics_path:  # None: log only (ranks > 0 of a parallel run)
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)

    def __call__(self, s: StepStats) -> dict | None:
        if s.epoch != self._epoch:
            self._epoch, self._epoch_losses = s.epoch, []
        self._epoch_losses.append(s.loss)
        if s.step % self.per_print_times and s.step != self.total_steps:
            return None
        tokens_per_s, real_tokens_per_s = s.tokens / s.step_seconds, s.real_tokens / s.step_seconds
        samples_per_s_p = s.samples / self.world_size / s.step_seconds
        peak = peak_memory_mb(self.device)
        if self.sink_mode:
            loss_text = f"loss: {s.loss:5.3f}"
        else:
            mean = sum(self._epoch_losses) / len(self._epoch_losses)
            loss_text = f"loss:[{s.loss:5.3f}/{mean:5.3f}]"
        logger.info(
            "{ Epoch:[%3d/%3d], step:[%5d/%5d], %s, per_step_time: %dms, lr: [%.6g], "
            "overflow cond: %s, loss_scale: %s, global_norm: [%.6g], tokens/s: %.1f, real_tokens/s: %.1f, "
            "peak_mem: %.1fMB",
            s.epoch, self.epochs, s.step_in_epoch, self.steps_per_epoch, loss_text,
            int(s.step_seconds * 1000), s.lr, s.overflow, s.loss_scale, s.global_norm,
            tokens_per_s, real_tokens_per_s, peak)
        done = s.step / self.total_steps
        bar = "█" * int(done * 50)
        eta = datetime.timedelta(seconds=int((self.total_steps - s.step) * s.step_seconds))
        logger.info("  %4.1f%% |%-50s| %.5f samples/s/p  %s }", done * 100, bar, samples_per_s_p, eta)
        record = {
            "step": s.step, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "loss": s.loss,
            "lr": s.lr, "tokens_per_s": tokens_per_s,
            "real_tokens_per_s": real_tokens_per_s, "samples_per_s_per_rank": samples_per_s_p,
            "step_time_ms": s.step_seconds * 1000, "global_norm": s.global_norm,
            "overflow": s.overflow, "loss_scale": s.loss_scale, "peak_mem_mb": peak,
        }
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def read_losses(metrics_path: str) -> list[tuple[int, float]]:
    """(step, loss) pairs of a metrics.jsonl file."""
    with open(metrics_path) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, filter(str.strip, f))]


def plot_loss_curve(png_path: str, curves: dict[str, list[tuple[int, float]]],
                    title: str = "training loss") -> str | None:
    """Draw each named (step, loss) curve, raw and as a moving average, into a PNG.

    Returns the path, or None (with an install hint in the log) when matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("Loss curve not drawn: matplotlib is missing (pip install 'mftune[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, points in curves.items():
        if not points:
            continue
        steps, losses = zip(*points)
        line, = ax.plot(steps, losses, lw=0.8, alpha=0.35)
        window = max(1, len(losses) // 10)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, color=line.get_color(), label=f"{label} (moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def fresh_metrics_file(output_dir: str) -> str:
    """metrics.jsonl of this run, new; an earlier run's file (which a run moves aside when it starts,
    ``trainer.outputs``) is moved to metrics.jsonl.1 here too, for a caller that did not."""
    path = os.path.join(output_dir, METRICS)
    kept = rotate(path, KEEP)
    if kept:
        logger.info("Kept the previous run's metrics as %s", kept)
    return path


@contextlib.contextmanager
def progress_bar(total: int):
    """A tqdm bar when stderr is a terminal, with log lines printed above it; otherwise a no-op."""
    if not sys.stderr.isatty():
        yield _NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm(loggers=[logger]), tqdm(total=total, desc="train", unit="step",
                                                          dynamic_ncols=True) as bar:
        yield bar


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def report_outputs(output_dir: str, metrics_path: str, saver) -> None:
    """The loss curve, the end-of-run lines naming every output, and run_summary.json (atomically)."""
    png = plot_loss_curve(os.path.join(output_dir, LOSS_CURVE),
                          {"loss": read_losses(metrics_path)}) if os.path.exists(metrics_path) else None
    lines = [f"Training finished. Outputs in {output_dir}:",
             f"  logs:        {os.path.join(output_dir, 'log', 'rank_0', 'info.log')}",
             f"  metrics:     {metrics_path}"]
    if saver:
        lines.append(f"  checkpoints: {saver.dir}"
                     + (f" (last: {os.path.basename(saver.written[-1])})" if saver.written else ""))
    if png:
        lines.append(f"  loss curve:  {png}")
    lines.append(f"  config:      {os.path.join(output_dir, RESOLVED_CONFIG)}")
    logger.info("\n".join(lines))
    with atomic_open(os.path.join(output_dir, RUN_SUMMARY)) as f:
        json.dump({"metrics": metrics_path, "loss_curve": png,
                   "checkpoint": saver.written[-1] if saver and saver.written else None}, f, indent=1)
