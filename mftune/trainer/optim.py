"""Optimizer, learning-rate schedules and loss scaling with MindFormers' semantics (reference §1.5)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from mftune.config.schema import LRScheduleConfig, OptimizerConfig, RunnerWrapperConfig
from mftune.pet.lora import LORA_B

logger = logging.getLogger("mftune")


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    lora_plus_lr_ratio: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D parameters and biases get no weight decay.

    Every optimizer ``type`` the config accepts (AdamW, FP32StateAdamWeightDecay,
    AdamWeightDecay) is this AdamW. Trainable parameters are float32 (the trainer keeps fp32
    master weights), so the moments are float32 too, as FP32StateAdamWeightDecay requires.
    ``lora_plus_lr_ratio`` (LoRA+, pet_config): LoRA's B factors learn at that multiple of the learning
    rate. Each group's ``lr_scale`` is what the training loop multiplies the scheduled rate by.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        scale = float(lora_plus_lr_ratio) if lora_plus_lr_ratio and name.endswith(LORA_B) else 1.0
        groups.setdefault((not decay, scale), []).append(param)
    if not groups:
        raise ValueError("no trainable parameters: check pet_config.target_modules / freeze_exclude")
    boosted = sum(len(p) for (_, scale), p in groups.items() if scale != 1.0)
    if boosted:  # the log lines show the scheduled rate (A's): say what B gets
        logger.info("LoRA+: %d B factors learn at %g x the scheduled learning rate (the logged lr is the scheduled "
                    "one, which A and every other trained parameter use)", boosted, float(lora_plus_lr_ratio))
    betas = tuple(cfg.betas) if cfg.betas else (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                               "lr": lr * scale, "lr_scale": scale}
                              for (no_decay, scale), params in sorted(groups.items(), key=lambda kv: kv[0])],
                             lr=lr, betas=betas, eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled learning rate for the next step: each group's ``lr_scale`` times ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
