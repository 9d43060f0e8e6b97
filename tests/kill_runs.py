"""kill -9 during training and its saves, then ``--resume_training True``: the machinery shared by
bench/kill_trials.py (random moments, N trials) and tests/e2e/test_kill_during_save.py (fixed moments).

``setup(d)`` writes parity's tiny model, data and base checkpoint and a one-process LoRA config that saves
every ``SAVE_EVERY`` steps and keeps ``KEEP`` checkpoints (so pruning happens too), with LoRA dropout on (the
RNG state must be restored for the resumed run to match); ``reference(...)`` is the uninterrupted run.
``trial(...)`` starts the same run, kills it with SIGKILL at a ``Kill`` moment, inspects what the kill left,
resumes it in the same output_dir as a user would (the same command plus ``--load_checkpoint <output_dir>/
checkpoint --resume_training True``; a run killed before its first save is started again), and compares the
result with the reference: every step's loss after the resume point and every tensor of the final checkpoint
bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml

import parity as pp
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.trainer.resume import damage

ROOT = pp.ROOT
BATCH, SAVE_EVERY, KEEP = 2, 3, 2  # 48 records / 2 = 24 steps, a save every 3 steps: 8 saves
STEPS = pp.GLOBAL_BATCH * pp.STEPS // BATCH
TEMPORARY = re.compile(r"(\.tmp\.([0-9a-f]{8}-)?\d+$)|(^\..+\.tmp-[A-Za-z0-9_-]+$)")  # fileio's temporary names
RESUMED = re.compile(r"Resuming from (\S+): epoch (\d+), step (\d+) \(global step (\d+)\)")


def setup(d: str, steps_per_save: int = SAVE_EVERY, batch: int = BATCH) -> str:
    """parity's workdir in ``d`` and the trial config; returns the config's path."""
    with open(pp.make_workdir(d)) as f:
        cfg = yaml.safe_load(f)
    cfg["use_parallel"] = False
    cfg["runner_config"].update({"batch_size": batch, "epochs": 1})
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.05
    for callback in cfg["callbacks"]:
        if callback["type"] == "CheckpointMonitor":
            callback.update({"save_checkpoint_steps": steps_per_save, "keep_checkpoint_max": KEEP})
    path = os.path.join(d, "kill.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def command(config: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "run_finetune.py"), "--config", config, "--output_dir", out, *extra]


def _env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MFTUNE_FAULT", "MFTUNE_DEBUG")}
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if fault:
        env["MFTUNE_FAULT"] = fault
    return env


def run(config: str, out: str, *extra: str, log: str) -> int:
    with open(log, "w") as f:
        return subprocess.run(command(config, out, *extra), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=_env(), timeout=900).returncode


@dataclass
class Result:
    """The reference run: losses per step, its final checkpoint, its wall time and the part of it spent training
    (from its first logged step to its end)."""
    losses: dict[int, float]
    final: str | None
    seconds: float = 0.0
    training_seconds: float = 0.0


def metrics(out: str) -> dict[int, float]:
    """step -> loss from ``out``/metrics.jsonl; the last record of a step wins, a torn last line is skipped."""
    found: dict[int, float] = {}
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                found[int(record["step"])] = record["loss"]
    return found


def ckpt_dir(out: str) -> str:
    return os.path.join(out, "checkpoint", "rank_0")


def meta(out: str) -> dict | None:
    """rank_0/meta.json, None when there is none (ValueError when it is not JSON: a torn completion mark)."""
    path = os.path.join(ckpt_dir(out), "meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def final_checkpoint(out: str) -> str | None:
    m = meta(out)
    return os.path.join(ckpt_dir(out), m["last_ckpt_file"]) if m else None


def reference(config: str, out: str) -> Result:
    start = time.time()
    with open(out + ".log", "w") as f:
        proc = subprocess.Popen(command(config, out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
        first = _first_step(proc, out)
        status = proc.wait()
    assert status == 0, open(out + ".log").read()[-3000:]
    end = time.time()
    return Result(metrics(out), final_checkpoint(out), end - start, end - first)


def _steps_logged(proc: subprocess.Popen, out: str, steps: float) -> float | None:
    """Wait until metrics.jsonl holds ``steps`` records; the time its last step took as seen here (None if the
    run ended first)."""
    path = os.path.join(out, "metrics.jsonl")
    seen, last = 0, time.time()
    interval = 0.0
    while proc.poll() is None:
        try:
            with open(path, "rb") as f:
                count = f.read().count(b"\n")
        except FileNotFoundError:
            count = 0
        if count > seen:
            interval, last, seen = time.time() - last, time.time(), count
        if count >= steps:
            return interval
        time.sleep(0.0005)
    return None


def _first_step(proc: subprocess.Popen, out: str) -> float:
    """When the run logs its first step (metrics.jsonl appears), or ends."""
    while proc.poll() is None and not os.path.exists(os.path.join(out, "metrics.jsonl")):
        time.sleep(0.001)
    return time.time()


@dataclass(frozen=True)
class Kill:
    """When to kill: ``at`` "step" (when step ``value`` is logged in metrics.jsonl, plus ``extra`` times the time
    that step took: a moment inside the next step, whatever the machine's speed), "file" (when a checkpoint's temporary
    file ``<name>.safetensors.tmp.<pid>`` of a save at step >= ``value`` appears, plus ``extra`` seconds),
    "meta" (when the temporary meta.json of such a save appears) or "fault" (MFTUNE_FAULT kills the process
    itself just before step ``value``)."""
    at: str
    value: float
    extra: float = 0.0

    def __str__(self) -> str:
        extra = f"+{self.extra * 1000:.0f}ms" if self.extra else ""
        return {"step": f"step {self.value:g} + {self.extra:.2f} step", "file": f"ckpt tmp >= step {self.value:g}{extra}",
                "meta": f"meta tmp >= step {self.value:g}{extra}", "fault": f"fault at step {self.value:g}"}[self.at]


def temporaries(folder: str) -> list[str]:
    """mftune's temporary files and folders under ``folder`` (relative paths)."""
    found = []
    for directory, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(directory, n), folder) for n in [*files, *dirs] if TEMPORARY.search(n)]
    return sorted(found)


def _saved_step(name: str) -> int:
    match = re.search(r"-\d+_(\d+)\.safetensors", name)
    return int(match.group(1)) if match else -1


def _watch(proc: subprocess.Popen, out: str, kill: Kill, deadline: float) -> bool:
    """Poll the checkpoint folder until the temporary file ``kill`` waits for appears; False if the run ended first."""
    folder = ckpt_dir(out)
    while time.time() < deadline and proc.poll() is None:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        for name in names:
            if ".tmp." not in name:
                continue
            if kill.at == "file" and ".safetensors.tmp." in name and _saved_step(name) >= kill.value:
                return True
            if kill.at == "meta" and name.startswith("meta.json.tmp.") and _newest_step(names) >= kill.value:
                return True
        time.sleep(0.0003)
    return False


def _newest_step(names: list[str]) -> int:
    return max([_saved_step(n) for n in names if n.endswith(".safetensors")], default=-1)


def start_and_kill(config: str, out: str, kill: Kill, log: str) -> tuple[float, bool]:
    """Run until ``kill``; (seconds from the start to the kill, whether it was killed before it ended)."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(command(config, out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(f"rank=0,step={int(kill.value)},kind=kill" if kill.at == "fault" else None))
        if kill.at == "step":
            interval = _steps_logged(proc, out, kill.value)
            time.sleep(kill.extra * (interval or 0.0))
        elif kill.at in ("file", "meta") and _watch(proc, out, kill, start + 600) and kill.extra:
            time.sleep(kill.extra)
        elif kill.at == "fault":
            proc.wait()
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        status = proc.wait()
    return time.time() - start, killed or status == -signal.SIGKILL


@dataclass
class Trial:
    kill: Kill
    delay: float = 0.0
    killed: bool = False
    where: str = ""
    left: list[str] = field(default_factory=list)  # temporary files the kill left
    lost: list[str] = field(default_factory=list)  # checkpoints meta.json names that are missing or damaged
    resumed_from: int | None = None  # step; 0: started again (no checkpoint yet); None: the run had finished
    leftover: list[str] = field(default_factory=list)  # temporary files still there after the next start
    compared_steps: int = 0  # steps after the resume point whose losses were compared
    loss_diff: list[int] = field(default_factory=list)  # steps whose loss differs from the reference
    tensor_diff: list[str] = field(default_factory=list)  # final-checkpoint tensors that differ
    status: int = 0  # the resumed (or restarted) run's exit status
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.leftover or self.loss_diff or self.tensor_diff or self.status)


def where_killed(out: str, left: list[str]) -> str:
    """Which part of the run the kill interrupted, from what it left in the checkpoint folder."""
    for name in left:
        if ".safetensors.tmp." in name:
            return f"writing ckpt step {_saved_step(name)}"
    for name in left:
        if "meta.json.tmp." in name:
            return "writing meta.json"
    try:
        m = meta(out)
    except ValueError:
        return "meta.json torn"
    names = os.listdir(ckpt_dir(out)) if os.path.isdir(ckpt_dir(out)) else []
    newest = _newest_step(names)
    if m is None:
        return "before the first save" if newest < 0 else "after a file, before its meta.json"
    if newest > int(m["last_step"]):
        return "after a file, before its meta.json"
    return "between saves" if int(m["last_step"]) < STEPS else "after the last save"


def lost_checkpoints(out: str) -> list[str]:
    """The checkpoint meta.json names, when it is missing or damaged (size, header, every tensor read)."""
    try:
        m = meta(out)
    except ValueError as exc:
        return [f"meta.json: {exc}"]
    if m is None:
        return []
    path = os.path.join(ckpt_dir(out), m["last_ckpt_file"])
    if not os.path.exists(path):
        return [f"{m['last_ckpt_file']}: missing"]
    why = damage(path)
    if why:
        return [f"{m['last_ckpt_file']}: {why}"]
    try:
        load_tensors(path)  # checks the checksums mftune writes, where there are
    except Exception as exc:  # noqa: BLE001 -- any failure to read it back is a lost checkpoint
        return [f"{m['last_ckpt_file']}: {exc}"]
    return []


def newest_checkpoint(out: str) -> tuple[int, str | None]:
    """(step, path) of the newest checkpoint file the kill left intact (what resume_training True takes),
    (0, None) when there is none."""
    folder = ckpt_dir(out)
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")] if os.path.isdir(folder) else []
    steps = sorted((_saved_step(n), os.path.join(folder, n)) for n in names if not damage(os.path.join(folder, n)))
    return steps[-1] if steps else (0, None)


def trial(config: str, out: str, kill: Kill, ref: Result) -> Trial:
    """Kill, inspect, resume (or start again; nothing when the run saved its end), compare with ``ref``."""
    t = Trial(kill)
    start = time.time()
    t.delay, t.killed = start_and_kill(config, out, kill, out + ".killed.log")
    t.left = temporaries(out)
    t.where = where_killed(out, t.left) if t.killed else "not killed (ended first)"
    t.lost = lost_checkpoints(out)
    step, final = newest_checkpoint(out)
    if step >= STEPS:
        t.resumed_from = None  # the run had saved its end: nothing to resume
    else:
        extra = ("--load_checkpoint", os.path.join(out, "checkpoint"), "--resume_training", "True") if final else ()
        t.status = run(config, out, *extra, log=out + ".resumed.log")
        with open(out + ".resumed.log") as f:
            found = RESUMED.search(f.read())
        t.resumed_from = int(found.group(4)) if found else 0
        final = final_checkpoint(out) if t.status == 0 else None
    t.leftover = temporaries(out) if t.resumed_from is not None else []  # no next start: nothing to check
    _compare(t, out, ref, final)
    t.seconds = time.time() - start
    return t


def _compare(t: Trial, out: str, ref: Result, final: str | None) -> None:
    got = metrics(out)
    first = (t.resumed_from or 0) + 1 if t.resumed_from is not None else STEPS + 1
    steps = range(first, STEPS + 1)
    t.compared_steps = len(steps)
    t.loss_diff = [s for s in steps if got.get(s) != ref.losses.get(s)]
    if final is None or not os.path.exists(final):
        t.tensor_diff = ["<no final checkpoint>"]
        return
    a, b = load_tensors(ref.final), load_tensors(final)
    t.tensor_diff = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not (
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
