"""scripts/launcher.sh / mftune.launch: msrun_launcher.sh's forms on torchrun (reference/mindformers.md §3).

Expected defaults, notices and forms come from msrun_launcher.sh r1.3.0 as summarised in
reference/mindformers.md §3; JOIN=True in forms 1-2 is our documented deviation. Real torchrun jobs
through the bash script: tests/distributed/test_launcher_jobs.py.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from mftune import launch
from mftune.launch import LaunchArgs, UsageError, build_command, parse_args, worker_env

REPO = Path(__file__).resolve().parents[2]
FORM_LINES = [line for line in launch.USAGE.splitlines() if line.startswith("  bash scripts/launcher.sh")]


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


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
        sys.executable, "-m", "mftune.launch_agent", "--log-dir", str(tmp_path / "l"), "--heartbeat-timeout", "30",
        "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
        "--master-port", "9000", "--max-restarts", "0",
        "-m", "mftune.launch", "--worker", str(tmp_path / "l"), script, "--x", "1"]
    assert worker_env(args, {"PATH": "/bin"}, start=12.5) == {"PATH": "/bin", "MFTUNE_CLUSTER_TIME_OUT": "60",
                                                              "MFTUNE_JOB_START": "12.500"}


def test_help_prints_usage(capsys):
    assert launch.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in FORM_LINES)
