"""Unit tests of the trainer's parts: schedules, optimizer groups, loss scale, log format,
checkpoint names/retention and complete-checkpoint loading."""
import json
import logging
import os
import re

import pytest
import torch
from torch import nn

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.safetensors_io import read_metadata
from mftune.errors import CheckpointError
from mftune.config import LRScheduleConfig, OptimizerConfig, RunnerWrapperConfig
from mftune.trainer.checkpointing import CheckpointMonitor
from mftune.trainer.monitor import LossMonitor, StepStats
from mftune.trainer.optim import LossScaler, build_optimizer, build_schedule


def test_total_steps_and_warmup_follow_mindformers_worked_example():
    # reference/mindformers.md §1.5: alpaca 52,002 records at global batch 16 -> 3,250 steps per
    # epoch; 2 epochs -> total 6,500 steps; warmup_ratio 0.03 -> 195 warmup steps.
    cfg = LRScheduleConfig(type="CosineWithWarmUpLR", learning_rate=1e-5, lr_end=0.0,
                           warmup_ratio=0.03, total_steps=-1)
    s = build_schedule(cfg, OptimizerConfig(), steps_per_epoch=52002 // 16, epochs=2)
    assert (s.total_steps, s.warmup_steps) == (6500, 195)


def test_cosine_schedule_values():
    # Linear warmup then 0.5 * (1 + cos(pi * progress)) between learning_rate and lr_end.
    cfg = LRScheduleConfig(type="CosineWithWarmUpLR", learning_rate=1.0, lr_end=0.0,
                           warmup_steps=10, total_steps=110)
    s = build_schedule(cfg, OptimizerConfig(), steps_per_epoch=1, epochs=1)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half way through the decay: cos(pi/2) = 0
    assert s(110) == pytest.approx(0.0, abs=1e-12)
    cfg.lr_end = 0.1
    s = build_schedule(cfg, OptimizerConfig(), 1, 1)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    # MindFormers' LinearWithWarmUpLR: learning_rate * max(0, (total - step) / linear_steps); lr_end unused.
    lin = build_schedule(LRScheduleConfig(type="LinearWithWarmUpLR", learning_rate=1.0, lr_end=0.5,
                                          warmup_steps=0, total_steps=100), OptimizerConfig(), 1, 1)
    assert lin(0) == 1.0 and lin(25) == pytest.approx(0.75) and lin(100) == pytest.approx(0.0)
    const = build_schedule(LRScheduleConfig(type="ConstantWarmUpLR", learning_rate=0.3,
                                            warmup_steps=3, total_steps=10), OptimizerConfig(), 1, 1)
    assert const(1) == pytest.approx(0.1) and const(3) == const(9) == 0.3
    none = build_schedule(None, OptimizerConfig(learning_rate=0.25), 5, 2)
    assert none(0) == none(9) == 0.25


def test_no_weight_decay_on_1d_parameters_and_betas():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1, beta1=0.8, beta2=0.95), 1e-3)
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.95)
    assert build_optimizer(model, OptimizerConfig(betas=[0.7, 0.9]), 1e-3).param_groups[0]["betas"] == (0.7, 0.9)


def test_dynamic_loss_scale():
    sc = LossScaler(RunnerWrapperConfig(scale_sense={"type": "DynamicLossScaleUpdateCell",
                                                     "loss_scale_value": 1024, "scale_factor": 2,
                                                     "scale_window": 2}))
    sc.update(overflow=True)
    assert sc.scale == 512
    sc.update(False)
    sc.update(False)
    assert sc.scale == 1024
    static = LossScaler(RunnerWrapperConfig(scale_sense=4.0))
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 8.0)
    static.unscale_([p])
    static.update(True)
    assert static.scale == 4.0 and p.grad.tolist() == [2.0, 2.0]


def test_loss_monitor_lines_match_mindformers_format(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    mon = LossMonitor(str(metrics), epochs=2, steps_per_epoch=3250, world_size=1,
                      device=torch.device("cpu"))
    logger = logging.getLogger("mftune")
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="mftune"):
        # 16 x 4096 tokens in 3.141 s; ETA = (6500 - 2) steps x 3.141 s = 5:40:10.
        mon(StepStats(step=2, epoch=1, step_in_epoch=2, loss=1.2344, lr=2.05e-7, step_seconds=3.141,
                      global_norm=0.87, overflow=False, loss_scale=1.0, tokens=16 * 4096,
                      real_tokens=8 * 4096, samples=16))
    logger.propagate = False
    first, second = [r.getMessage() for r in caplog.records]
    # reference/mindformers.md §8.1 example rendering, plus mftune's tokens/s and peak memory.
    assert first.startswith("{ Epoch:[  1/  2], step:[    2/ 3250], loss: 1.234, per_step_time: 3141ms, "
                            "lr: [2.05e-07], overflow cond: False, loss_scale: 1.0, global_norm: [0.87]")
    assert re.search(r", tokens/s: 20864\.7, real_tokens/s: 10432\.3, peak_mem: [\d.]+MB$", first)
    assert re.fullmatch(r"   0\.0% \|\s{50}\| 5\.09392 samples/s/p  5:40:10 }", second)
    rec = json.loads(metrics.read_text())
    assert {"step", "epoch", "loss", "lr", "tokens_per_s", "real_tokens_per_s"} <= rec.keys() and rec["step"] == 2


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))


def test_checkpoint_monitor_names_meta_retention_and_prefix(tmp_path):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    mon = CheckpointMonitor(str(tmp_path), "llama", keep_checkpoint_max=2)
    for step in (2, 4, 6):
        mon.save(model, opt, epoch=1, step_in_epoch=step, global_step=step, loss_scale=1.0,
                 global_batch_size=8, model_config={"hidden_size": 4}, extra_metadata={"run_mode": "train"})
    rank_dir = tmp_path / "checkpoint" / "rank_0"
    assert sorted(os.listdir(rank_dir)) == ["llama_rank_0-1_4.safetensors", "llama_rank_0-1_6.safetensors",
                                            "meta.json"]
    assert json.loads((rank_dir / "meta.json").read_text()) == {
        "last_epoch": 1, "last_step": 6, "last_ckpt_file": "llama_rank_0-1_6.safetensors",
        "file_size": os.path.getsize(rank_dir / "llama_rank_0-1_6.safetensors")}
    path = str(rank_dir / "llama_rank_0-1_6.safetensors")
    from safetensors.torch import load_file
    t = load_file(path)
    assert {"0.weight", "0.bias", "1.weight", "adam_m.0.weight", "adam_v.1.weight", "global_step",
            "epoch_num", "step_num", "loss_scale"} <= t.keys()
    assert int(t["global_step"]) == 6 and torch.equal(t["adam_m.0.weight"], opt.state[model[0].weight]["exp_avg"])
    assert read_metadata(path)["model_config"] == {"hidden_size": 4}
    # A second run into the same directory never overwrites or prunes the first run's files.
    again = CheckpointMonitor(str(tmp_path), "llama", keep_checkpoint_max=1)
    assert again.prefix == "llama_rank_0_1"


def test_load_checkpoint_checks_shapes_and_missing_tensors(tmp_path):
    model = _tiny()
    path = str(tmp_path / "m.safetensors")
    save_complete(path, dict(model.state_dict()), model_config={})
    fresh = _tiny()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_checkpoint(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    bad = dict(model.state_dict())
    bad["1.weight"] = torch.zeros(2, 5)
    save_complete(path, bad, model_config={})
    with pytest.raises(CheckpointError, match=r"1\.weight has shape \[2, 5\] but the model expects \[2, 4\]"):
        load_checkpoint(fresh, path)
    del bad["1.weight"]
    save_complete(path, bad, model_config={})
    with pytest.raises(CheckpointError, match=r"lacks base weights of this model: 1\.weight"):
        load_checkpoint(fresh, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(fresh, str(tmp_path / "junk.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(fresh, str(tmp_path / "missing.safetensors"))


def test_cosine_decay_steps_then_lr_end():
    # MindFormers' CosineWithWarmUpLR (lr_schedule.py): the cosine runs over total - warmup steps;
    # decay_steps is the step from which lr_end is returned. total 100, decay_steps 20:
    # step 10 -> 0.5 * (1 + cos(pi * 0.1)) = 0.97553, step 19 -> 0.91355, step 20 -> lr_end.
    cfg = LRScheduleConfig(type="CosineWithWarmUpLR", learning_rate=1.0, lr_end=0.0, warmup_steps=0,
                           total_steps=100, decay_steps=20)
    s = build_schedule(cfg, OptimizerConfig(), 1, 1)
    assert s(10) == pytest.approx(0.97553, abs=1e-5) and s(19) == pytest.approx(0.91355, abs=1e-5)
    assert s(20) == 0.0 and s(50) == 0.0
