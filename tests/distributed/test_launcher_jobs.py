"""scripts/launcher.sh and its torchrun workers as a user runs them (real processes, gloo on CPU): per-rank
logs by file descriptor, a failing rank ending the job, two nodes on one machine, JOIN False, and the
usage text without arguments."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


from parity import free_port

from mftune import launch

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "scripts" / "launcher.sh"
FORM_LINES = [line for line in launch.USAGE.splitlines() if line.startswith("  bash scripts/launcher.sh")]

# Initialise gloo from torchrun's environment, check an all_reduce, report rank and the timeout.
PROBE = """\
import os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
assert value.item() == world * (world + 1) / 2, value
os.system("echo c-level output of rank %d" % rank)   # a child process writes to fd 1 directly
print(f"rank {rank} of {world} ok args={sys.argv[1:]}")
print(f"MFTUNE_CLUSTER_TIME_OUT={os.environ.get('MFTUNE_CLUSTER_TIME_OUT')}")
dist.destroy_process_group()
"""

# Rank 1 exits 3 at once; rank 0 never notices (it sleeps, not in a collective): torchrun must stop it.
FAILING = """\
import sys, time
import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print("rank 1 giving up")
    sys.exit(3)
time.sleep(60)
"""


def run_launcher(*args: str, cwd: Path, timeout: float = 45) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_worker_logs_by_fd_and_reports_failure_on_console(tmp_path):
    """fds 1/2 (child processes too) go to worker_{RANK}.log; the console gets the failure and tail."""
    (tmp_path / "boom.py").write_text(
        "import os, sys\nos.system('echo from a child')\nprint('args', sys.argv)\nraise ValueError('boom')\n")
    proc = subprocess.run([sys.executable, "-m", "mftune.launch", "--worker", str(tmp_path / "logs"),
                           "boom.py", "--a"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RANK": "5", "PYTHONPATH": str(REPO)}, timeout=30)
    log = (tmp_path / "logs" / "worker_5.log").read_text()
    assert proc.returncode == 1 and proc.stdout == ""
    assert "from a child" in log and "args ['boom.py', '--a']" in log and "ValueError: boom" in log
    assert proc.stderr.startswith(f"mftune launcher: rank 5 failed (exit 1); see {tmp_path}/logs/worker_5.log")
    assert "[rank 5] ValueError: boom" in proc.stderr


def test_two_ranks_end_to_end(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    logs = tmp_path / "logs"
    proc = run_launcher(f"{tmp_path}/probe.py --x 1", "2", str(free_port()), str(logs), "True", "60",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Running Command:" in proc.stdout and f"Please check log files in {logs}" in proc.stdout
    assert "Job finished: exit status 0" in proc.stdout
    for rank in (0, 1):
        log = (logs / f"worker_{rank}.log").read_text()
        assert f"rank {rank} of 2 ok args=['--x', '1']" in log
        assert "MFTUNE_CLUSTER_TIME_OUT=60" in log and f"c-level output of rank {rank}" in log


def test_one_failing_rank_ends_the_job(tmp_path):
    (tmp_path / "failing.py").write_text(FAILING)
    logs = tmp_path / "logs"
    start = time.monotonic()
    proc = run_launcher("failing.py", "2", str(free_port()), str(logs), "True", "60", cwd=tmp_path, timeout=90)
    assert time.monotonic() - start < 45, "rank 0 was not stopped promptly (it sleeps 60 s)"
    # torchrun exits 1 whatever the worker's status; the worker line carries the real one (3).
    assert proc.returncode == 1
    assert f"mftune launcher: rank 1 failed (exit 3); see {logs}/worker_1.log" in proc.stderr
    assert "[rank 1] rank 1 giving up" in proc.stderr
    assert "first failure: rank 1 (exit 3)" in proc.stderr
    assert "ChildFailedError" not in proc.stderr  # torchrun's traceback dump is replaced by that line
    assert "Job finished: exit status 1" in proc.stdout


def test_two_nodes_on_one_machine(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    port, logs = str(free_port()), str(tmp_path / "logs")
    nodes = [subprocess.Popen(["bash", str(LAUNCHER), "probe.py", "4", "2", "127.0.0.1", port, str(rank),
                               logs, "True", "60"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "--nnodes 2 --nproc-per-node 2 --node-rank 1" in outputs[1]
    for rank in range(4):
        assert f"rank {rank} of 4 ok" in (tmp_path / "logs" / f"worker_{rank}.log").read_text()


def test_join_false_returns_at_once_and_the_job_completes(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    logs = tmp_path / "logs"
    proc = run_launcher("probe.py", "2", str(free_port()), str(logs), "False", "60", cwd=tmp_path, timeout=15)
    assert proc.returncode == 0, proc.stderr
    pid = int(re.search(r"torchrun PID (\d+)", proc.stdout).group(1))
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not all(
                (logs / f"worker_{r}.log").is_file() and "ok" in (logs / f"worker_{r}.log").read_text()
                for r in (0, 1)):
            time.sleep(0.5)
        assert "rank 1 of 2 ok" in (logs / "worker_1.log").read_text()
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        assert not _alive(pid), "torchrun still running"
        assert (logs / "scheduler.log").is_file()
    finally:
        if _alive(pid):
            os.killpg(pid, 9)    # its own session and process group (start_new_session)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launcher_sh_without_arguments_prints_usage(tmp_path):
    proc = run_launcher(cwd=tmp_path)
    assert proc.returncode == 1 and "0 argument(s) given" in proc.stderr and "Traceback" not in proc.stderr
    assert all(line in proc.stderr for line in FORM_LINES)
