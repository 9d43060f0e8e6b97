"""One torchrun worker of the launcher (``python -m mftune.launch --worker LOG_DIR script args...``).

It points fds 1 and 2 (its own and its children's) at ``LOG_DIR/worker_{RANK}.log`` (global rank, msrun's
names), moving a log an earlier attempt or job left there aside first (``worker_{RANK}.log.1``, ``.2`` ...:
``mftune.fileio.rotate``), registers ``faulthandler`` for SIGUSR1 into ``LOG_DIR/worker_{RANK}.stacks`` (the
hang watchdog asks for stacks that way), points ``MFTUNE_HEARTBEAT_FILE`` at ``LOG_DIR/.heartbeat_{RANK}``,
and runs the script as ``python script args`` would.

On failure it writes ``LOG_DIR/.exit_{RANK}`` (its status, whether it failed only because another rank went
away, whether it printed) for the launcher's torchrun process, and, unless the failure is such a peer error,
one line and the log's tail to the console (its original stderr). A rank that fails because a peer died
(gloo's "Connection closed by peer", an NCCL abort, a collective timeout) stays quiet on the console: the
first block printed must be the failed rank's, not a survivor's; the torchrun process names the survivors
after it (``mftune.launch_agent``).
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import os
import runpy
import signal
import sys
import time
import traceback
from collections.abc import Sequence

from mftune import heartbeat
from mftune.fileio import rotate
from mftune.launch_watchdog import stacks_path

# Messages and exception types of a collective that failed because another rank went away or never came.
PEER_ERROR_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")
PEER_ERROR_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crash",
                   "NCCL communicator was aborted", "remote process exited", "Timed out waiting",
                   "timed out in", "Socket Timeout", "ProcessGroupNCCL's watchdog")
TAIL_LINES = 5


def log_path(log_dir: str, rank: int | str) -> str:
    return os.path.join(log_dir, f"worker_{rank}.log")


def exit_record_path(log_dir: str, rank: int | str) -> str:
    return os.path.join(log_dir, f".exit_{rank}")


def is_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that another rank went away (or never answered), not that this one failed."""
    if any(t.__name__ in PEER_ERROR_TYPES for t in type(exc).__mro__):
        return True
    return any(text in str(exc) for text in PEER_ERROR_TEXT)


def log_tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log ([] when it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return [line.rstrip() for line in log if line.strip()][-lines:]
    except OSError:
        return []


def failure_block(rank: int | str, cause: str, path: str, extra: Sequence[str] = ()) -> str:
    """``mftune launcher: rank R <cause>; see <log>`` and the log's tail, as one string (one write)."""
    lines = [f"mftune launcher: rank {rank} {cause}; see {path}", *extra]
    lines += [f"  [rank {rank}] {line}" for line in log_tail(path)]
    return "\n".join(lines) + "\n"


def read_exit_record(log_dir: str, rank: int | str, pid: int) -> dict | None:
    """The exit record worker ``rank`` with process id ``pid`` wrote (None: none, or an earlier attempt's)."""
    try:
        with open(exit_record_path(log_dir, rank)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("pid") == pid else None


def _rotate_logs(log_dir: str, rank: str, keep: int) -> None:
    """Move this rank's log and stack dump of an earlier attempt aside; drop its stale records."""
    rotate(log_path(log_dir, rank), keep)
    stacks = stacks_path(log_dir, rank)
    if os.path.exists(stacks) and os.path.getsize(stacks) == 0:
        os.remove(stacks)  # nobody asked for stacks: nothing to keep
    rotate(stacks, keep)
    for stale in (exit_record_path(log_dir, rank), heartbeat.heartbeat_path(log_dir, rank)):
        if os.path.exists(stale):
            os.remove(stale)


def isolate_attempt(attempt: str) -> None:
    """Give a restarted attempt's process group a store of its own.

    Under torchrun's static rendezvous (the launcher's ``--master-addr/--master-port``) the agent keeps one
    TCPStore for the whole job and the workers write their process-group keys (gloo and NCCL addresses,
    barriers) into it without a prefix; a restarted attempt would read the dead attempt's addresses and fail
    to connect ("Connection refused"). So from the first restart on, the store every worker opens
    (``torch.distributed.rendezvous._create_c10d_store``, torch's env:// path) is seen through a
    ``PrefixStore`` named after the attempt; every node restarts together, so all ranks agree on it."""
    if attempt in ("", "0"):
        return
    import torch.distributed as dist  # a restarted worker trains with torch anyway

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module (dist.rendezvous: a function)
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is None:  # another torch: leave its own behaviour
        return

    def attempt_store(*args, **kwargs):
        return dist.PrefixStore(f"mftune_attempt_{attempt}", create(*args, **kwargs))

    rendezvous._create_c10d_store = attempt_store


def _redirect_output(path: str) -> int:
    """Point fds 1 and 2 (ours and our children's) at ``path``; return a dup of the console's stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # a file is block-buffered; SIGTERM would lose it
    return console


def _run_script(script: str, script_args: Sequence[str]) -> tuple[int, bool]:
    """Run ``script`` as ``python script args`` would: (its exit status, whether it failed on a peer error).
    A traceback goes to the log."""
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # python puts the script's folder first
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, False
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as python does
        return 1, False
    except BaseException as exc:  # noqa: BLE001 -- any failure of the user's script is reported, not re-raised
        traceback.print_exc()
        return 1, is_peer_error(exc)
    return 0, False


def run_worker(log_dir: str, script: str, script_args: Sequence[str], rank: str) -> int:
    """One torchrun worker: run the script with its output in LOG_DIR/worker_{rank}.log (module docstring)."""
    os.makedirs(log_dir, exist_ok=True)
    path = log_path(log_dir, rank)
    _rotate_logs(log_dir, rank, keep=5 + int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0))
    console = _redirect_output(path)
    faulthandler.enable()  # a native crash (SIGSEGV in a library) leaves the Python stacks in the log
    stacks = open(stacks_path(log_dir, rank), "a")  # noqa: SIM115 -- open for the life of the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ[heartbeat.ENV] = heartbeat.heartbeat_path(log_dir, rank)
    isolate_attempt(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    code, peer = _run_script(script, script_args)
    sys.stdout.flush()
    sys.stderr.flush()
    if not os.path.getsize(stacks.name):  # nobody asked for stacks: leave no empty file
        os.remove(stacks.name)
    if code:
        with open(exit_record_path(log_dir, rank), "w") as f:
            json.dump({"pid": os.getpid(), "code": code, "peer": peer, "printed": not peer, "time": time.time(),
                       "last": (log_tail(path, 1) or [""])[0]}, f)
        if not peer:
            os.write(console, failure_block(rank, f"failed (exit {code})", path).encode())  # one write
    return code
