"""MindFormers' scripts/msrun_launcher.sh on torchrun (reference/mindformers.md §3).

scripts/launcher.sh sets PYTHONPATH and runs ``python -m mftune.launch "$@"``; the logic is here,
where it is tested. The four positional forms and their defaults are msrun_launcher's (``USAGE``).
The launcher validates them, prints msrun's "Running Command:" and "Please check log files in"
lines, then starts

    python -m mftune.launch_agent --log-dir LOG_DIR --heartbeat-timeout S --nnodes N
        --nproc-per-node LOCAL_WORKER --node-rank R --master-addr ADDR --master-port PORT
        --max-restarts M -m mftune.launch --worker LOG_DIR script args...

(``mftune.launch_agent`` is ``python -m torch.distributed.run`` with the hang watchdog, the failure
report and no traceback dump) with MFTUNE_CLUSTER_TIME_OUT (seconds; the trainer's process-group
timeout) and MFTUNE_JOB_START (when the job started: a restart resumes only from checkpoints saved
after it) exported. torchrun sets RANK/WORLD_SIZE, so msrun's RANK_ID/RANK_SIZE are not needed. Each
worker (``--worker``, ``mftune.launch_worker``) writes LOG_DIR/worker_{RANK}.log (global rank, msrun's
names; an earlier attempt's moved to .1, .2 ...), runs the script as ``python script args`` would and,
on failure, writes one line and the log's tail to the console and exits with the script's status.
torchrun then stops the node's other workers and, with restarts left, starts them again, else exits 1.

``--max_restarts N`` and ``--heartbeat_timeout S`` may stand anywhere among the launcher's arguments
(also as ``--max_restarts=N``); without them the YAML named by ``--config`` in EXECUTE_ORDER gives them
(top-level keys ``max_restarts``, ``heartbeat_timeout``, ``base_config`` files followed), else the
defaults (0 restarts; 600 s). The YAML is read with plain PyYAML here: the launcher imports no torch.

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
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import yaml

from mftune.errors import UsageError, exit_status, print_debug_traceback
from mftune.fileio import rotate
from mftune.launch_worker import run_worker

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
Multi-node: run form 4 on every node with the same arguments and NODE_RANK 0, 1, ...
Options, anywhere among the arguments (the YAML named by --config gives them otherwise):
  --max_restarts N       restart a job whose rank died or hung up to N times, from its last complete
                         checkpoint (YAML key max_restarts; default 0: the job ends at the first failure)
  --heartbeat_timeout S  seconds without progress after which a training rank counts as hung (YAML key
                         heartbeat_timeout; default 600, or CLUSTER_TIME_OUT/2 if shorter; 0: no watchdog)"""

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
# The launcher's own options: name -> (default, what to give instead of a bad value).
OPTIONS: dict[str, tuple[int, str]] = {
    "max_restarts": (0, "Give e.g. --max_restarts 2 (0: the job ends at the first failure)."),
    "heartbeat_timeout": (600, "Give seconds, e.g. --heartbeat_timeout 600 (0: no hang watchdog)."),
}


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
    max_restarts: int = 0           # torchrun's --max-restarts: elastic restarts of the whole job
    heartbeat_timeout: int = 600    # seconds without a heartbeat before the watchdog looks for a hung rank
                                    # (default: 600, or half of CLUSTER_TIME_OUT when that is shorter)
    settings_from: str = ""         # where max_restarts / heartbeat_timeout came from, for the console

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


def split_options(argv: Sequence[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """The launcher's own options (``--max_restarts N``, ``--max_restarts=N``, also with hyphens), wherever
    they stand, out of ``argv``: (the positional arguments, {option: value as given}, errors)."""
    positional: list[str] = []
    given: dict[str, str] = {}
    errors: list[str] = []
    words = iter(argv)
    for word in words:
        name, eq, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name not in OPTIONS:
            positional.append(word)
            continue
        if not eq:
            value = next(words, None)
            if value is None:
                errors.append(f"--{name} is invalid: it needs a value. {OPTIONS[name][1]}")
                break
        given[name] = value
    return positional, given, errors


def _yaml_options(path: str, seen: tuple[str, ...] = ()) -> dict[str, object]:
    """``max_restarts`` / ``heartbeat_timeout`` of the YAML at ``path``, over its ``base_config`` files; {}
    when it cannot be read (the run itself reports that, with the trainer's full checks)."""
    real = os.path.realpath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict) or real in seen:
        return {}
    bases = data.get("base_config") or []
    out: dict[str, object] = {}
    for base in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else []:
        if isinstance(base, str):
            out.update(_yaml_options(os.path.join(os.path.dirname(path), base), (*seen, real)))
    out.update({name: data[name] for name in OPTIONS if name in data})
    return out


def _order_options(script_args: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """EXECUTE_ORDER's ``--config`` and its ``--max_restarts`` / ``--heartbeat_timeout`` overrides."""
    found: dict[str, str] = {}
    for i, word in enumerate(script_args):
        name, eq, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        if name in ("config", *OPTIONS) and (eq or i + 1 < len(script_args)):
            found[name] = value if eq else script_args[i + 1]
    return found.pop("config", None), found


def _whole(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None


def resolve_options(given: dict[str, str], script_args: Sequence[str]) -> tuple[dict[str, int], dict[str, str],
                                                                                list[str]]:
    """Each option from the launcher's flag, else EXECUTE_ORDER's override, else its YAML, else the default:
    (values, {option: where it came from} for the non-default ones, errors)."""
    config, overrides = _order_options(script_args)
    from_yaml = _yaml_options(config) if config else {}
    values, sources, errors = {}, {}, []
    for name, (default, fix) in OPTIONS.items():
        for value, source in ((given.get(name), f"--{name}"), (overrides.get(name), f"--{name} in EXECUTE_ORDER"),
                              (from_yaml.get(name), config)):
            if value is not None:
                break
        else:
            values[name] = default
            continue
        number = _whole(value)
        if number is None:
            errors.append(f"{name}={value} is invalid (from {source}): not a whole number >= 0. {fix}")
        else:
            values[name] = number
            sources[name] = source
    return values, sources, errors


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """msrun_launcher's positional forms and the launcher's options -> LaunchArgs; raises UsageError
    listing every mistake."""
    argv, given, option_errors = split_options(argv)
    if len(argv) not in FORMS:
        raise UsageError([f"{len(argv)} argument(s) given; the launcher takes 1, 2, 6 or 9. "
                          "Quote EXECUTE_ORDER as one argument and use one of the forms below.", *option_errors])
    raw = {**DEFAULTS, **dict(zip(FORMS[len(argv)], argv[1:]))}
    if "LOCAL_WORKER" not in FORMS[len(argv)]:    # forms 1-3 run on one node
        raw["LOCAL_WORKER"] = raw["WORKER_NUM"]
    words, errors = _split_order(argv[0])
    errors += _check_values(raw, FORMS[len(argv)]) + option_errors
    options, sources, more = resolve_options(given, words[1:]) if words else ({}, {}, [])
    if errors or more:
        raise UsageError(errors + more)
    if "heartbeat_timeout" not in sources:  # the default stays below the collectives' timeout
        options["heartbeat_timeout"] = min(options["heartbeat_timeout"], max(1, int(raw["CLUSTER_TIME_OUT"]) // 2))
    source = "; ".join(f"{name} {options[name]} from {where}" for name, where in sources.items())
    total, local = int(raw["WORKER_NUM"]), int(raw["LOCAL_WORKER"])
    notice = NOTICES["default"] if len(argv) == 1 else None
    if len(argv) == 9:
        notice = NOTICES["single"] if total == local else NOTICES["multi"].format(total, local)
    return LaunchArgs(words[0], tuple(words[1:]), total, local, raw["MASTER_ADDR"],
                      int(raw["MASTER_PORT"]), int(raw["NODE_RANK"]), raw["LOG_DIR"],
                      raw["JOIN"].lower() == "true", int(raw["CLUSTER_TIME_OUT"]), notice,
                      options["max_restarts"], options["heartbeat_timeout"], source)


def build_command(args: LaunchArgs) -> list[str]:
    """The torchrun argv (``mftune.launch_agent``: torchrun with the watchdog and the failure report).
    LOG_DIR is made absolute so workers agree on it whatever their cwd."""
    log_dir = os.path.abspath(args.log_dir)
    return [sys.executable, "-m", "mftune.launch_agent", "--log-dir", log_dir,
            "--heartbeat-timeout", str(args.heartbeat_timeout), "--nnodes", str(args.nnodes),
            "--nproc-per-node", str(args.local_worker), "--node-rank", str(args.node_rank),
            "--master-addr", args.master_addr, "--master-port", str(args.master_port),
            "--max-restarts", str(args.max_restarts), "-m", "mftune.launch", "--worker", log_dir,
            args.script, *args.script_args]


def worker_env(args: LaunchArgs, base: dict[str, str] | None = None, start: float | None = None) -> dict[str, str]:
    """The environment torchrun and its workers inherit: ``base`` plus MFTUNE_CLUSTER_TIME_OUT and
    MFTUNE_JOB_START (``start``, default now: a restarted rank resumes only from checkpoints saved since)."""
    return {**(os.environ if base is None else base), "MFTUNE_CLUSTER_TIME_OUT": str(args.cluster_time_out),
            "MFTUNE_JOB_START": f"{time.time() if start is None else start:.3f}"}


def settings_lines(args: LaunchArgs) -> list[str]:
    """What the console says of the restart budget and the watchdog (nothing when both are defaults)."""
    lines = []
    if args.settings_from or args.max_restarts:
        watch = f"a rank without progress for {args.heartbeat_timeout} s counts as hung" \
            if args.heartbeat_timeout else "no hang watchdog"
        lines.append(f"Restarts: up to {args.max_restarts}; {watch} ({args.settings_from or 'defaults'})")
    if 0 < args.cluster_time_out <= args.heartbeat_timeout:
        lines.append(f"Notice: heartbeat_timeout={args.heartbeat_timeout} is not below CLUSTER_TIME_OUT="
                     f"{args.cluster_time_out}: collectives time out first, so a hung rank's peers fail and the "
                     f"hung rank is not named. Give a heartbeat_timeout below CLUSTER_TIME_OUT.")
    return lines


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
    print("\n".join([f"Please check log files in {log_dir}", *settings_lines(args)]), flush=True)
    if not args.join:
        rotate(os.path.join(log_dir, "scheduler.log"))  # an earlier job's is kept as scheduler.log.1
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launcher.sh (launcher mode) and of torchrun's workers (``--worker``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
        print_debug_traceback(exc)  # MFTUNE_DEBUG=1 only
        print("\n".join(f"error: {line}" for line in exc.errors), file=sys.stderr)
        print(usage, file=sys.stderr)
        return exit_status(exc)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
