"""Optimizer, learning-rate schedules and loss scaling with MindFormers' semantics (reference §1.5)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mftune.config.schema import LRScheduleConfig, OptimizerConfig, RunnerWrapperConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D parameters and biases get no weight decay.

    Every optimizer ``type`` the config accepts (AdamW, FP32StateAdamWeightDecay,
    AdamWeightDecay) is this AdamW. Trainable parameters are float32 (the trainer keeps fp32
    master weights), so the moments are float32 too, as FP32StateAdamWeightDecay requires.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check pet_config.target_modules / freeze_exclude")
    betas = tuple(cfg.betas) if cfg.betas else (cfg.beta1, cfg.beta2)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps)


@dataclass
class LRSchedule:
    """Learning rate as a function of the optimizer step (0-based), as MindFormers' schedules.

    warmup: linear from ``warmup_lr_init`` to ``learning_rate`` over ``warmup_steps``; then
    cosine over ``total_steps - warmup_steps`` (``num_cycles`` 0.5 = one half-cosine down to
    ``lr_end``; from step ``decay_steps`` on, ``lr_end``), linear down to 0 (MindFormers'
    LinearWithWarmUpLR ignores lr_end), or constant.
    """

    kind: str
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr_init: float = 0.0
    lr_end: float = 0.0
    num_cycles: float = 0.5
    decay_steps: int | None = None  # cosine only: lr_end from this step on; None = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / self.warmup_steps
        if self.kind in ("constant", "ConstantWarmUpLR"):
            return self.learning_rate
        if self.kind == "LinearWithWarmUpLR":
            linear_steps = max(1, self.total_steps - self.warmup_steps)
            return self.learning_rate * max(0.0, 1.0 - (step - self.warmup_steps) / linear_steps)
        if self.decay_steps is not None and step >= self.decay_steps:
            return self.lr_end
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * 2.0 * self.num_cycles * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * max(0.0, factor)


def build_schedule(cfg: LRScheduleConfig | None, optimizer_cfg: OptimizerConfig,
                   steps_per_epoch: int, epochs: int) -> LRSchedule:
    """``total_steps: -1`` = epochs x optimizer steps per epoch; warmup_steps = int(total x warmup_ratio)."""
    if cfg is None:
        return LRSchedule("constant", optimizer_cfg.learning_rate, steps_per_epoch * epochs)
    total = cfg.total_steps if cfg.total_steps and cfg.total_steps > 0 else steps_per_epoch * epochs
    warmup = int(total * cfg.warmup_ratio) if cfg.warmup_ratio is not None else cfg.warmup_steps
    return LRSchedule(cfg.type, cfg.learning_rate, total, warmup, cfg.warmup_lr_init,
                      cfg.lr_end, cfg.num_cycles, cfg.decay_steps)


class LossScaler:
    """``runner_wrapper.scale_sense``: a static scale, or DynamicLossScaleUpdateCell.

    The loss is multiplied by ``scale`` before backward and gradients divided by it after.
    Non-finite gradients mark an overflow: the step is skipped and, when dynamic, the scale is
    divided by ``scale_factor``; after ``scale_window`` good steps it is multiplied by it.
    """

    def __init__(self, wrapper: RunnerWrapperConfig):
        sense = wrapper.scale_sense
        self.dynamic = isinstance(sense, dict)
        if self.dynamic:
            self.scale = float(sense.get("loss_scale_value", 2.0 ** 16))
            self.factor = float(sense.get("scale_factor", 2))
            self.window = int(sense.get("scale_window", 1000))
        else:
            self.scale, self.factor, self.window = float(sense), 1.0, 0
        self.good_steps = 0

    def unscale_(self, params: list[torch.Tensor]) -> None:
        if self.scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.scale = max(1.0, self.scale / self.factor)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= self.factor
                self.good_steps = 0
