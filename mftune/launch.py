"""MindFormers' scripts/msrun_launcher.sh on torchrun (reference/mindformers.md §3).

scripts/launcher.sh sets PYTHONPATH and runs ``python -m mftune.launch "$@"``; the logic is here,
where it is tested. The four positional forms and their defaults are msrun_launcher's (``USAGE``).
The launcher validates them, prints msrun's "Running Command:" and "Please check log files in"
lines, then starts

    python -m mftune.launch --torchrun --nnodes N --nproc-per-node LOCAL_WORKER --node-rank R
        --master-addr ADDR --master-port PORT -m mftune.launch --worker LOG_DIR script args...

(``--torchrun`` is ``python -m torch.distributed.run`` without its traceback dump on failure)

with MFTUNE_CLUSTER_TIME_OUT exported (seconds; the trainer's process-group timeout). torchrun sets
RANK/WORLD_SIZE, so msrun's RANK_ID/RANK_SIZE are not needed. Each worker (``--worker``) points fds
1 and 2 at LOG_DIR/worker_{RANK}.log (global rank, msrun's names), runs the script as ``python
script args`` would and, on failure, writes one line and the log's tail to the console (its original
stderr) and exits with the script's status. torchrun then stops the node's other workers and exits 1.

Deviations from msrun_launcher:
  * Forms 1 and 2 wait for the job (JOIN=True; msrun's default is False): the headline command
    ``bash scripts/launcher.sh "run_finetune.py --config ... --run_mode finetune" 8`` must run the
    job to completion and return its exit status. JOIN=True runs torchrun in the foreground and
    exits with its status (0 or 1); JOIN=False starts it in its own session, output in
    LOG_DIR/scheduler.log (msrun's file), and returns 0 at once.
  * WORKER_NUM=1 is allowed (r1.5.0 refuses it); ``ulimit -u``, MF_LOG_SUFFIX and the Ascend plog
    variables have no torch counterpart. Node 0 checks that MASTER_PORT is free before starting.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import traceback
from collections.abc import Sequence

from mftune.errors import UsageError, exit_status

__all__ = ["LaunchArgs", "UsageError", "USAGE", "parse_args", "build_command", "worker_env", "main"]

USAGE = """\
Usage (EXECUTE_ORDER is "script.py args..."; a leading "python" is dropped):
  bash scripts/launcher.sh "EXECUTE_ORDER"
  bash scripts/launcher.sh "EXECUTE_ORDER" WORKER_NUM
  bash scripts/launcher.sh "EXECUTE_ORDER" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
  bash scripts/launcher.sh "EXECUTE_ORDER" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
Defaults: WORKER_NUM=8 LOCAL_WORKER=WORKER_NUM MASTER_ADDR=127.0.0.1 MASTER_PORT=8118 NODE_RANK=0
  LOG_DIR=output/msrun_log CLUSTER_TIME_OUT=7200 (seconds) JOIN=True in forms 1-2 (msrun: False).
JOIN=True waits for the job and exits with its status; JOIN=False starts it in the background
  (torchrun output in LOG_DIR/scheduler.log) and returns at once. Ranks log to LOG_DIR/worker_{rank}.log.
Multi-node: run form 4 on every node with the same arguments and NODE_RANK 0, 1, ..."""

DEFAULTS: dict[str, str] = {"WORKER_NUM": "8", "LOCAL_WORKER": "8", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "8118", "NODE_RANK": "0", "LOG_DIR": "output/msrun_log",
                            "JOIN": "True", "CLUSTER_TIME_OUT": "7200"}
# Argument count (EXECUTE_ORDER included) -> the names of the positional arguments after it.
FORMS: dict[int, tuple[str, ...]] = {
    1: (), 2: ("WORKER_NUM",), 6: ("WORKER_NUM", "MASTER_PORT", "LOG_DIR", "JOIN", "CLUSTER_TIME_OUT"),
    9: ("WORKER_NUM", "LOCAL_WORKER", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOG_DIR", "JOIN",
        "CLUSTER_TIME_OUT")}
NOTICES: dict[str, str] = {  # msrun_launcher's informational lines
    "default": "No parameter is entered. Notice that the program will run on default 8 cards.",
    "single": "worker_num is equal to local_worker, Notice that task will run on single node.",
    "multi": "worker_num={}, local_worker={}, Please run this script on other nodes with different node_rank."}
# name -> (smallest, largest or None, what to give instead).
NUMBERS: dict[str, tuple[int, int | None, str]] = {
    "WORKER_NUM": (1, None, "Give the total number of worker processes, e.g. 8."),
    "LOCAL_WORKER": (1, None, "Give the number of worker processes on this node, e.g. 8."),
    "MASTER_PORT": (1, 65535, "Give a free TCP port, e.g. 8118."),
    "NODE_RANK": (0, None, "Give this node's index: 0 on the master node, then 1, 2, ..."),
    "CLUSTER_TIME_OUT": (1, None, "Give a timeout in seconds, e.g. 7200."),
}
PYTHON_WORD = re.compile(r"python[0-9.]*")


@dataclasses.dataclass(frozen=True)
class LaunchArgs:
    """A validated launch (defaults live in DEFAULTS): ``worker_num % local_worker == 0``, ``node_rank < nnodes``."""

    script: str                     # as given (relative to the working directory, like msrun)
    script_args: tuple[str, ...]
    worker_num: int
    local_worker: int
    master_addr: str
    master_port: int
    node_rank: int
    log_dir: str                    # created by the launcher and by every worker
    join: bool
    cluster_time_out: int           # seconds, exported as MFTUNE_CLUSTER_TIME_OUT
    notice: str | None = None       # msrun's informational line for forms 1 and 4

    @property
    def nnodes(self) -> int:
        return self.worker_num // self.local_worker


def _split_order(order: str) -> tuple[list[str], list[str]]:
    """``"[python] script args"`` -> (words, errors); the script must be an existing file."""
    try:
        words = shlex.split(order)
    except ValueError as exc:
        return [], [f"EXECUTE_ORDER={order!r} is invalid: {exc}. Balance its quotes."]
    if words and PYTHON_WORD.fullmatch(os.path.basename(words[0])):
        words = words[1:]
    if not words or words[0].startswith("-"):
        return [], [f"EXECUTE_ORDER={order!r} is invalid: it must start with a script path. "
                    'Give it as "script.py args..." (python -m is not supported).']
    if not os.path.isfile(words[0]):
        return [], [f"EXECUTE_ORDER={order!r} is invalid: script {words[0]} does not exist in "
                    f"{os.getcwd()}. Run from the folder that holds it or give its path."]
    return words, []


def _check_values(raw: dict[str, str], given: tuple[str, ...]) -> list[str]:
    """Every problem in the ``given`` arguments (defaults and derived values are valid if they are)."""
    errors = []
    for name in (n for n in given if n in NUMBERS):
        (least, most, fix), value = NUMBERS[name], raw[name]
        if not (value.isascii() and value.isdigit() and least <= int(value) <= (most or int(value))):
            bounds = f"from {least} to {most}" if most else f">= {least}"
            errors.append(f"{name}={value} is invalid: not a whole number {bounds}. {fix}")
    if raw["JOIN"].lower() not in ("true", "false"):
        errors.append(f"JOIN={raw['JOIN']} is invalid: must be True or False. "
                      "True waits for the job; False runs it in the background.")
    if errors:
        return errors
    total, local = int(raw["WORKER_NUM"]), int(raw["LOCAL_WORKER"])
    if total % local:
        return [f"WORKER_NUM={total} is invalid: not a multiple of LOCAL_WORKER={local}. "
                "Every node runs LOCAL_WORKER workers; make WORKER_NUM a multiple of it."]
    if int(raw["NODE_RANK"]) >= total // local:
        errors.append(f"NODE_RANK={raw['NODE_RANK']} is invalid: the job has {total // local} node(s) "
                      f"(WORKER_NUM / LOCAL_WORKER). Give 0 to {total // local - 1}.")
    return errors


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """msrun_launcher's positional forms -> LaunchArgs; raises UsageError listing every mistake."""
    if len(argv) not in FORMS:
        raise UsageError([f"{len(argv)} argument(s) given; the launcher takes 1, 2, 6 or 9. "
                          "Quote EXECUTE_ORDER as one argument and use one of the forms below."])
    raw = {**DEFAULTS, **dict(zip(FORMS[len(argv)], argv[1:]))}
    if "LOCAL_WORKER" not in FORMS[len(argv)]:    # forms 1-3 run on one node
        raw["LOCAL_WORKER"] = raw["WORKER_NUM"]
    words, errors = _split_order(argv[0])
    errors += _check_values(raw, FORMS[len(argv)])
    if errors:
        raise UsageError(errors)
    total, local = int(raw["WORKER_NUM"]), int(raw["LOCAL_WORKER"])
    notice = NOTICES["default"] if len(argv) == 1 else None
    if len(argv) == 9:
        notice = NOTICES["single"] if total == local else NOTICES["multi"].format(total, local)
    return LaunchArgs(words[0], tuple(words[1:]), total, local, raw["MASTER_ADDR"],
                      int(raw["MASTER_PORT"]), int(raw["NODE_RANK"]), raw["LOG_DIR"],
                      raw["JOIN"].lower() == "true", int(raw["CLUSTER_TIME_OUT"]), notice)


def build_command(args: LaunchArgs) -> list[str]:
    """The torchrun argv (run through ``--torchrun``, see ``run_torchrun``). LOG_DIR is made
    absolute so workers agree on it whatever their cwd."""
    return [sys.executable, "-m", "mftune.launch", "--torchrun", "--nnodes", str(args.nnodes),
            "--nproc-per-node", str(args.local_worker), "--node-rank", str(args.node_rank),
            "--master-addr", args.master_addr, "--master-port", str(args.master_port),
            "-m", "mftune.launch", "--worker", os.path.abspath(args.log_dir),
            args.script, *args.script_args]


def worker_env(args: LaunchArgs, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment torchrun and its workers inherit: ``base`` plus MFTUNE_CLUSTER_TIME_OUT."""
    return {**(os.environ if base is None else base), "MFTUNE_CLUSTER_TIME_OUT": str(args.cluster_time_out)}


def _prepare_machine(args: LaunchArgs) -> None:
    """Create LOG_DIR and, on node 0 (host of torchrun's TCPStore), check that MASTER_PORT is free.

    The probe sets SO_REUSEADDR like TCPStore, so TIME_WAIT leftovers do not count and it fails only
    where torchrun would (with a long traceback). The port can still be taken before torchrun binds.
    """
    try:
        os.makedirs(args.log_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError([f"LOG_DIR={args.log_dir} is invalid: {exc.strerror}. Give a writable folder."])
    if args.node_rank:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", args.master_port))
        except OSError as exc:
            raise UsageError([f"MASTER_PORT={args.master_port} is invalid: it is in use on this machine "
                              f"({exc.strerror}). Give a free port (forms 3 and 4 take MASTER_PORT)."])


def launch(args: LaunchArgs) -> int:
    """Print msrun's lines and run torchrun: foreground (JOIN) -> its exit status; else 0."""
    if args.notice:
        print(args.notice)
    cmd, log_dir = build_command(args), os.path.abspath(args.log_dir)
    print(f"Running Command: {shlex.join(cmd)}")
    print(f"Please check log files in {log_dir}", flush=True)
    if not args.join:
        with open(os.path.join(log_dir, "scheduler.log"), "wb") as log:
            proc = subprocess.Popen(cmd, env=worker_env(args), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        print(f"Job started in the background (torchrun PID {proc.pid}); follow it with "
              f"tail -f {log_dir}/scheduler.log {log_dir}/worker_*.log")
        return 0
    proc = subprocess.Popen(cmd, env=worker_env(args))
    try:
        code = proc.wait()
    except KeyboardInterrupt:       # the terminal sent SIGINT to torchrun too; let it stop its workers
        code = proc.wait()
    code = 128 - code if code < 0 else code
    print(f"Job finished: exit status {code}" + (f"; see {log_dir}/worker_*.log" if code else ""))
    return code


def _redirect_output(log_path: str) -> int:
    """Point fds 1 and 2 (ours and our children's) at ``log_path``; return a dup of the console's stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)     # a file is block-buffered; SIGTERM would lose it
    return console


def _run_script(script: str, script_args: Sequence[str]) -> int:
    """Run ``script`` as ``python script args`` would; its exit status (a traceback goes to the log)."""
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))     # python puts the script's folder first
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)                        # sys.exit("message"), as python does
        return 1
    except BaseException:  # noqa: BLE001 -- any failure of the user's script is reported, not re-raised
        traceback.print_exc()
        return 1
    return 0


def run_worker(log_dir: str, script: str, script_args: Sequence[str], rank: str) -> int:
    """One torchrun worker: run the script with its output in LOG_DIR/worker_{rank}.log."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"worker_{rank}.log")
    console = _redirect_output(log_path)
    faulthandler.enable()  # a native crash (SIGSEGV in a library) leaves the Python stacks in the log
    code = _run_script(script, script_args)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = [line.rstrip() for line in log if line.strip()][-5:]
        lines = [f"mftune launcher: rank {rank} failed (exit {code}); see {log_path}"]
        lines += [f"  [rank {rank}] {line}" for line in tail]
        os.write(console, ("\n".join(lines) + "\n").encode())  # one write: ranks do not interleave
    return code


def run_torchrun(torchrun_args: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) with its arguments, minus its failure dump.

    torchrun's own ``main`` prints a Python traceback and a table of every rank on any failure;
    the failing rank has already written its message and log tail to the console (``run_worker``),
    so this prints one line naming the first failed rank instead.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_parse_args
    from torch.distributed.run import run

    try:
        run(torchrun_parse_args(list(torchrun_args)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"mftune launcher: the job failed; first failure: rank {rank} (exit {failure.exitcode})",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launcher.sh (launcher mode), of torchrun (``--torchrun``) and of its
    workers (``--worker``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--torchrun"]:
        return run_torchrun(argv[1:])
    if argv[:1] == ["--worker"]:
        if len(argv) < 3 or "RANK" not in os.environ:
            print("error: --worker LOG_DIR script [args...] is run by torchrun (RANK must be set); "
                  "start jobs with scripts/launcher.sh.", file=sys.stderr)
            return 2
        return run_worker(argv[1], argv[2], argv[3:], os.environ["RANK"])
    usage = USAGE.replace("scripts/launcher.sh", os.environ.get("MFTUNE_LAUNCHER", "scripts/launcher.sh"))
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    try:
        args = parse_args(argv)
        _prepare_machine(args)
    except UsageError as exc:
        print("\n".join(f"error: {line}" for line in exc.errors), file=sys.stderr)
        print(usage, file=sys.stderr)
        return exit_status(exc)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
