"""The training loop: epochs of optimizer steps, each over this rank's micro-batches of a global batch.

``TrainRun`` holds what one run trains with, ``LoopSettings`` what the loop reads of the
configuration; ``train_loop`` runs every step from a ``Position`` (a fresh run's, or a resumed one's).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from mftune.config.schema import MFConfig
from mftune.data.loader import TrainData
from mftune.errors import TrainingError
from mftune.faults import inject_fault
from mftune.heartbeat import beat, phase
from mftune.models.llama import LlamaForCausalLM
from mftune.parallel.data_parallel import all_reduce_grads, clip_grad_norm_, settle_grads
from mftune.parallel.layout import local
from mftune.parallel.mesh import ParallelContext
from mftune.trainer.checkpointing import CheckpointMonitor
from mftune.trainer.evaluate import batch_loss
from mftune.trainer.monitor import LossMonitor, StepStats
from mftune.trainer.optim import LossScaler, LRSchedule, set_lr

MAX_NONFINITE_STEPS = 5  # consecutive skipped steps (static loss scale) before training stops


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of the configuration."""

    epochs: int
    save_checkpoint_steps: int | None  # None: no CheckpointMonitor
    eval_step_interval: int  # -1: off
    eval_epoch_interval: int  # -1: off
    max_grad_norm: float  # inf: no clipping

    @classmethod
    def from_config(cls, cfg: MFConfig) -> LoopSettings:
        ckpt = cfg.callback("CheckpointMonitor")
        wrapper = cfg.runner_wrapper
        return cls(cfg.runner_config.epochs, ckpt.save_checkpoint_steps if ckpt else None, cfg.eval_step_interval,
                   cfg.eval_epoch_interval, wrapper.max_grad_norm if wrapper.use_clip_grad else math.inf)


@dataclass(frozen=True)
class Position:
    """Where training stands: the epoch (1-based), the steps done in it, the global step."""

    epoch: int = 1
    done_in_epoch: int = 0
    global_step: int = 0


@dataclass
class TrainRun:
    """What one run trains with."""

    model: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    schedule: LRSchedule
    data: TrainData
    monitor: LossMonitor
    ctx: ParallelContext
    saver: CheckpointMonitor | None = None  # the CheckpointMonitor callback
    checkpoint_metadata: dict | None = None  # model_config and extra_metadata of every checkpoint
    evaluate: Callable[[int], None] | None = None  # do_eval: evaluate(global_step)

    def save(self, epoch: int, step_in_epoch: int, global_step: int) -> None:
        with phase("save", global_step):  # the launcher's watchdog: a save is progress, not a hang
            self.saver.save(self.model, self.optimizer, epoch=epoch, step_in_epoch=step_in_epoch,
                            global_step=global_step, loss_scale=self.scaler.scale,
                            loss_scale_good_steps=self.scaler.good_steps,
                            global_batch_size=self.data.global_batch_size, **self.checkpoint_metadata)


def train_loop(run: TrainRun, settings: LoopSettings, start: Position, progress) -> int:
    """All epochs from ``start``; returns the global step reached. Saves every ``save_checkpoint_steps``
    steps; evaluates every ``eval_step_interval`` steps and at the end of every ``eval_epoch_interval``-th
    epoch; stops (TrainingError) after MAX_NONFINITE_STEPS skipped steps in a row it cannot recover from."""
    global_step, nonfinite, evaluated = start.global_step, 0, False
    progress.update(global_step)
    for epoch in range(start.epoch, settings.epochs + 1):
        skip = start.done_in_epoch if epoch == start.epoch else 0
        for step_in_epoch, micro_batches in enumerate(run.data.epoch(epoch - 1, start_step=skip), start=skip + 1):
            beat("step", global_step + 1)  # the launcher's hang watchdog (mftune.heartbeat)
            inject_fault(global_step + 1)  # tests only: MFTUNE_FAULT (mftune.faults)
            began = time.perf_counter()
            stats = train_step(run, settings, micro_batches, run.schedule(global_step))
            if run.ctx.device.type == "cuda":
                torch.cuda.synchronize(run.ctx.device)
            global_step += 1
            run.monitor(StepStats(step=global_step, epoch=epoch, step_in_epoch=step_in_epoch,
                                  step_seconds=time.perf_counter() - began,
                                  tokens=run.data.global_batch_size * (run.data.record_length - 1),
                                  samples=run.data.global_batch_size, **stats))
            progress.update(1)
            stuck = not run.scaler.dynamic or run.scaler.scale <= 1.0  # a dynamic scale cannot go lower
            nonfinite = nonfinite + 1 if stats["overflow"] and stuck else 0
            if nonfinite >= MAX_NONFINITE_STEPS:
                raise TrainingError(
                    f"the loss or gradients were not finite for {nonfinite} consecutive steps "
                    f"(last: step {global_step}, loss {stats['loss']}); the updates were skipped. " +
                    (_damaged_weights(run.model) or "Lower the learning rate, use compute_dtype bfloat16 instead "
                     "of float16, or use a DynamicLossScaleUpdateCell scale_sense."))
            if run.saver and global_step % settings.save_checkpoint_steps == 0:
                run.save(epoch, step_in_epoch, global_step)
            evaluated = _due(settings.eval_step_interval, global_step) and run.evaluate is not None
            if evaluated:
                run.evaluate(global_step)
        if run.evaluate and not evaluated and _due(settings.eval_epoch_interval, epoch):
            run.evaluate(global_step)
    if nonfinite:
        raise TrainingError(f"the last {nonfinite} step(s) had a non-finite loss or gradients and were "
                            f"skipped; no final checkpoint was written. " + (
                                _damaged_weights(run.model) or "Check the model_config values, lower the "
                                "learning rate, or use compute_dtype bfloat16."))
    beat("done")  # the watchdog stops watching this rank (final save, report, shutdown follow)
    return global_step


def _damaged_weights(model: torch.nn.Module) -> str:
    """When the model's own weights hold NaN or Inf (this rank's blocks; a finite step never makes them so),
    the sentence that names them and blames the checkpoint, not the learning rate; else "". Checked only
    once training has failed: an isfinite pass over every weight at load time would cost more than the read."""
    with torch.no_grad():
        bad = [name for name, p in model.named_parameters()
               if p.is_floating_point() and not bool(torch.isfinite(local(p)).all())]
    if not bad:
        return ""
    return (f"The model's weights are not finite ({', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}): "
            f"the checkpoint they were loaded from holds NaN or Inf values (damaged, or saved by a diverged run). "
            f"Load another checkpoint.")


def _due(interval: int, count: int) -> bool:
    return interval > 0 and count % interval == 0


def train_step(run: TrainRun, settings: LoopSettings, micro_batches: list[dict[str, torch.Tensor]],
               lr: float) -> dict:
    """One optimizer step over this rank's micro-batches of a global batch.

    The loss is the mean over every supervised token of the global batch (token-weighted, counted
    over all data-parallel ranks), and gradients are summed over data parallel, so the result does
    not depend on how the batch is split into micro-batches or ranks. Every rank computes the same
    global norm, so all agree on clipping and on skipping a non-finite step.
    """
    model, ctx = run.model, run.ctx
    trainable = [p for p in model.parameters() if p.requires_grad]
    fsdp = hasattr(model, "set_requires_gradient_sync")
    counts = _token_counts(model, micro_batches, ctx)  # supervised tokens, non-pad input tokens
    denom = max(float(counts[0]), 1.0)
    total = torch.zeros((), device=ctx.device)
    for k, mb in enumerate(micro_batches):
        if fsdp:  # reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with loss_parallel() if ctx.vocab_parallel else contextlib.nullcontext():
            loss_sum, _ = batch_loss(model, mb, ctx.device)
            loss_sum = local(loss_sum)  # a replicated DTensor under loss_parallel
            (loss_sum * (run.scaler.scale / denom)).backward()
        total += loss_sum.detach()  # no host sync per micro-batch
    if ctx.dp_group is not None:
        if not fsdp:
            all_reduce_grads(trainable, ctx.dp_group)
        dist.all_reduce(total, group=ctx.dp_group)
    settle_grads(trainable)
    run.scaler.unscale_(trainable)
    norm = clip_grad_norm_(trainable, settings.max_grad_norm)
    overflow = not math.isfinite(norm)
    if not overflow:
        set_lr(run.optimizer, lr)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_scale = run.scaler.scale
    run.scaler.update(overflow)
    return {"loss": float(total) / denom, "lr": lr, "global_norm": norm, "overflow": overflow,
            "loss_scale": loss_scale, "real_tokens": int(counts[1])}


def _token_counts(model: LlamaForCausalLM, micro_batches: list[dict[str, torch.Tensor]],
                  ctx: ParallelContext) -> torch.Tensor:
    """(supervised tokens, non-pad input tokens) of the whole global batch, summed over data parallel;
    supervised as the model's loss counts them (``loss_targets``: pad inputs dropped when masked)."""
    ignore, pad = model.config.ignore_token_id, model.config.pad_token_id
    counts = torch.tensor([[int((model.loss_targets(mb["input_ids"], mb["labels"]) != ignore).sum()),
                            int((mb["input_ids"][:, :-1] != pad).sum())]
                           for mb in micro_batches], dtype=torch.float64, device=ctx.device).sum(0)
    if ctx.dp_group is not None:
        dist.all_reduce(counts, group=ctx.dp_group)
    return counts
