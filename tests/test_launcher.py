"""scripts/launcher.sh / mftune.launch: msrun_launcher.sh's forms on torchrun (reference/mindformers.md §3).

Expected defaults, notices and forms come from msrun_launcher.sh r1.3.0 as summarised in
reference/mindformers.md §3; JOIN=True in forms 1-2 is our documented deviation. The end-to-end
tests start real torchrun jobs (gloo, 2 or 4 CPU processes) through the bash script.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mftune import launch
from mftune.launch import LaunchArgs, UsageError, build_command, parse_args, worker_env

REPO = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


def run_launcher(*args: str, cwd: Path, timeout: float = 45) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- parsing, unit level

def test_form1_defaults_are_msruns(script):
    args = parse_args([script])
    assert args == LaunchArgs(script, (), 8, 8, "127.0.0.1", 8118, 0, "output/msrun_log", True, 7200,
                              "No parameter is entered. Notice that the program will run on default 8 cards.")


def test_form2_sets_local_worker_and_joins(script):
    args = parse_args([f"python {script} --config a.yaml --run_mode finetune", "4"])
    assert (args.script, args.script_args) == (script, ("--config", "a.yaml", "--run_mode", "finetune"))
    assert (args.worker_num, args.local_worker, args.nnodes, args.join, args.notice) == (4, 4, 1, True, None)


def test_form3_single_node_custom(script):
    args = parse_args([f'python3 {script} --name "a b"', "2", "9000", "logs", "false", "60"])
    assert args.script_args == ("--name", "a b")
    assert (args.worker_num, args.local_worker, args.master_port, args.log_dir, args.join,
            args.cluster_time_out) == (2, 2, 9000, "logs", False, 60)


def test_form4_multi_node_and_notices(script):
    args = parse_args([script, "16", "8", "10.0.0.1", "8118", "1", "out", "TRUE", "300"])
    assert (args.nnodes, args.node_rank, args.master_addr, args.join) == (2, 1, "10.0.0.1", True)
    assert args.notice == ("worker_num=16, local_worker=8, "
                           "Please run this script on other nodes with different node_rank.")
    single = parse_args([script, "8", "8", "127.0.0.1", "8118", "0", "out", "False", "300"])
    assert single.notice == "worker_num is equal to local_worker, Notice that task will run on single node."


FORM3 = ["2", "9000", "logs", "True", "60"]
FORM4 = ["8", "4", "127.0.0.1", "9000", "0", "logs", "True", "60"]


@pytest.mark.parametrize("tail, expected", [
    (["2", "3"], "3 argument(s) given"),
    (["eight"], "WORKER_NUM=eight is invalid"),
    (["0"], "WORKER_NUM=0 is invalid"),
    (["2", "90a", "logs", "True", "60"], "MASTER_PORT=90a is invalid"),
    (["2", "70000", "logs", "True", "60"], "MASTER_PORT=70000 is invalid"),
    (["2", "9000", "logs", "yes", "60"], "JOIN=yes is invalid"),
    (["2", "9000", "logs", "True", "1h"], "CLUSTER_TIME_OUT=1h is invalid"),
    (["8", "x", *FORM4[2:]], "LOCAL_WORKER=x is invalid"),
    (["8", "4", "127.0.0.1", "9000", "-1", *FORM4[5:]], "NODE_RANK=-1 is invalid"),
    (["8", "3", *FORM4[2:]], "WORKER_NUM=8 is invalid: not a multiple of LOCAL_WORKER=3"),
    (["8", "4", "127.0.0.1", "9000", "2", *FORM4[5:]], "NODE_RANK=2 is invalid: the job has 2 node(s)"),
])
def test_bad_arguments_exit_1_with_message_and_usage(script, capsys, tail, expected):
    assert launch.main([script, *tail]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert all(line in err for line in FORM_LINES) and "Traceback" not in err


@pytest.mark.parametrize("order, expected", [
    ("missing.py --x 1", "script missing.py does not exist"),
    ("python", "it must start with a script path"),
    ("python -m mftune.trainer.main", "it must start with a script path"),
    ("train.py --name 'unbalanced", "No closing quotation"),
])
def test_bad_execute_order(tmp_path, monkeypatch, capsys, order, expected):
    monkeypatch.chdir(tmp_path)
    assert launch.main([order, *FORM3]) == 1
    err = capsys.readouterr().err
    assert "EXECUTE_ORDER=" in err and expected in err and "Usage" in err


def test_every_mistake_is_reported_together(script):
    with pytest.raises(UsageError) as exc:
        parse_args(["missing.py", "x", "9000", "logs", "maybe", "60"])
    assert [e.split("=")[0] for e in exc.value.errors] == ["EXECUTE_ORDER", "WORKER_NUM", "JOIN"]


def test_busy_master_port_is_a_readable_error(script, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launch.main([script, "2", str(port), "logs", "True", "60"]) == 1
    assert f"MASTER_PORT={port} is invalid: it is in use" in capsys.readouterr().err


def test_build_command_and_env(script, tmp_path):
    args = parse_args([f"{script} --x 1", "4", "2", "10.0.0.1", "9000", "1", str(tmp_path / "l"), "True", "60"])
    assert build_command(args) == [
        sys.executable, "-m", "mftune.launch", "--torchrun", "--nnodes", "2", "--nproc-per-node", "2",
        "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "9000",
        "-m", "mftune.launch", "--worker", str(tmp_path / "l"), script, "--x", "1"]
    assert worker_env(args, {"PATH": "/bin"}) == {"PATH": "/bin", "MFTUNE_CLUSTER_TIME_OUT": "60"}


def test_help_prints_usage(capsys):
    assert launch.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in FORM_LINES)


# ----------------------------------------------------------------------- worker mode, one process

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


# ------------------------------------------------------------------ end to end through launcher.sh

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
