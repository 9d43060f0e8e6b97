"""Automatic restarts and the hang watchdog, as a user runs them: ``bash scripts/launcher.sh "run_finetune.py
..." 2 PORT LOG True 60 --max_restarts 2 [--heartbeat_timeout 8]`` on two gloo CPU ranks, with a fault injected
into rank 1 (MFTUNE_FAULT, mftune/faults.py: first attempt only). The job must finish by itself with every
step's loss equal to an uninterrupted two-rank run of the same command (the reference: resumed runs are bit
for bit the same in the same layout), and the console must name rank 1 and the cause first. Without a budget
the job fails as before (exit 1) and a new job keeps the failed job's worker logs (rotated, not truncated).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parity import ROOT, free_port, make_workdir  # noqa: E402

STEPS_SAVED = 2  # save every 2 steps: rank 1 fails at step 4, so the job resumes at step 2 and redoes step 3
CLUSTER_TIME_OUT = "60"  # the gloo timeout; the watchdog must name the hung rank long before it
# seconds without a step before the watchdog looks: short for the test, yet above a step's time on a loaded
# 2-core machine (a slower step would be a computing rank named hung while its peer waits for it)
HEARTBEAT_S = "8"


def _launch(order: str, out: str, *options: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MFTUNE_FAULT"}
    if fault:
        env["MFTUNE_FAULT"] = fault
    return subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(free_port()), os.path.join(out, "msrun_log"),
                           "True", CLUSTER_TIME_OUT, *options], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)


def _train(config: str, out: str, *options: str, fault: str | None = None) -> subprocess.CompletedProcess:
    order = (f"run_finetune.py --config {config} --run_mode finetune --output_dir {out} --batch_size 4 "
             f"--use_parallel True --parallel_config.data_parallel 2 --parallel_config.model_parallel 1 "
             f"--callbacks.1.save_checkpoint_steps {STEPS_SAVED}")
    return _launch(order, out, *options, fault=fault)


def step_losses(out: str) -> dict[int, float]:
    """Every step's loss over all attempts (metrics.jsonl and the earlier attempts' set-aside copies); a step
    that two attempts both ran must have had the same loss in both."""
    found: dict[int, float] = {}
    for path in glob.glob(os.path.join(out, "metrics*.jsonl*")):
        with open(path) as f:
            for record in map(json.loads, filter(str.strip, f)):
                assert found.setdefault(record["step"], record["loss"]) == record["loss"], (path, record)
    return found


def first_report(stderr: str) -> str:
    """The first line the launcher prints about a rank."""
    return next(line for line in stderr.splitlines() if line.startswith("mftune launcher: rank"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[str, dict[int, float]]:
    """The tiny parity model, data and config, and the uninterrupted two-rank run's losses."""
    d = str(tmp_path_factory.mktemp("restart"))
    config = make_workdir(d)
    reference = os.path.join(d, "reference")
    proc = _train(config, reference)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = step_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return config, losses


def test_killed_rank_restarts_the_job_from_its_last_checkpoint(workdir, tmp_path):
    config, reference = workdir
    out = str(tmp_path / "out")
    proc = _train(config, out, "--max_restarts", "2", fault="rank=1,step=4,kind=kill")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert first_report(proc.stderr).startswith("mftune launcher: rank 1 killed by signal 9 (SIGKILL); see ")
    assert ("mftune launcher: rank 1 killed by signal 9 (SIGKILL); restarting the job from its last complete "
            "checkpoint (restart 1 of 2)") in proc.stderr
    assert "[rank 1] MFTUNE_FAULT: rank 1 kill at step 4 (attempt 0)" in proc.stderr  # the launcher printed its tail
    assert "Job finished: exit status 0" in proc.stdout
    logs = os.path.join(out, "msrun_log")
    assert "MFTUNE_FAULT: rank 1 kill at step 4" in open(os.path.join(logs, "worker_1.log.1")).read()
    resumed = open(os.path.join(logs, "worker_0.log")).read()
    assert re.search(r"restart 1 of 2: resuming from \S+rank_0-1_2\.safetensors \(step 2\)", resumed), resumed
    assert step_losses(out) == reference  # every step, bit for bit


def test_hung_rank_is_named_killed_and_the_job_restarted(workdir, tmp_path):
    config, reference = workdir
    out = str(tmp_path / "out")
    proc = _train(config, out, "--max_restarts", "2", "--heartbeat_timeout", HEARTBEAT_S,
                  fault="rank=1,step=4,kind=hang")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert first_report(proc.stderr).startswith("mftune launcher: rank 1 stopped progressing (hung) at step 4; see ")
    assert "while rank(s) 0 wait for it in a collective; its main thread is in faults.py" in proc.stderr
    assert "rank 0 stopped progressing" not in proc.stderr and "Timed out" not in proc.stderr
    assert ("rank 1 stopped progressing (hung) at step 4; restarting the job from its last complete checkpoint "
            "(restart 1 of 2)") in proc.stderr
    stacks = open(os.path.join(out, "msrun_log", "worker_1.stacks.1")).read()  # the dump the verdict came from
    assert "in inject_fault" in stacks
    assert step_losses(out) == reference


PROBE = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
print(f"job {os.environ['JOB']} attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} rank {dist.get_rank()}", flush=True)
value = torch.ones(1)
dist.all_reduce(value)
if dist.get_rank() == 1:
    os.kill(os.getpid(), 9)  # every attempt
dist.all_reduce(value)
"""


def test_without_budget_the_job_fails_as_before_and_keeps_the_logs(tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text(PROBE)
    logs = tmp_path / "msrun_log"
    monkeypatch.setenv("JOB", "1")
    first = _launch(str(tmp_path / "probe.py"), str(tmp_path))
    assert first.returncode == 1, first.stdout + first.stderr
    assert first_report(first.stderr).startswith("mftune launcher: rank 1 killed by signal 9 (SIGKILL)")
    assert "first failure: rank 1 (killed by signal 9 (SIGKILL))" in first.stderr and "restart" not in first.stderr
    assert "job 1 attempt 0 rank 1" in (logs / "worker_1.log").read_text()  # the failed attempt's log is there
    monkeypatch.setenv("JOB", "2")
    second = _launch(str(tmp_path / "probe.py"), str(tmp_path), "--max_restarts", "1")
    assert second.returncode == 1
    assert "restarting the job from its last complete checkpoint (restart 1 of 1)" in second.stderr
    assert "mftune launcher: rank 1 killed by signal 9 (SIGKILL); no restarts left (1 used)" in second.stderr
    # the newest attempt's log, then the earlier attempt's, then the first job's: nothing truncated
    assert [(logs / name).read_text().splitlines()[0] for name in ("worker_1.log", "worker_1.log.1", "worker_1.log.2")] \
        == ["job 2 attempt 1 rank 1", "job 2 attempt 0 rank 1", "job 1 attempt 0 rank 1"]
