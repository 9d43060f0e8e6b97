"""Heartbeats: each training rank says, in a tiny file, that it is still making progress.

Under the launcher every worker (``mftune.launch_worker``) points ``MFTUNE_HEARTBEAT_FILE`` at
``LOG_DIR/.heartbeat_{rank}``; the trainer calls ``beat`` at every step, at every evaluation batch and
around saves. A beat rewrites one fixed-size record in place (``os.pwrite`` at offset 0: no rename, no
fsync, a few microseconds): ``time step phase pid thread``. The launcher's torchrun process reads the
records of its local workers (``mftune.launch_watchdog``) to decide that a job stopped progressing.
Without the launcher (no ``MFTUNE_HEARTBEAT_FILE``) ``beat`` does nothing.

Phases: ``step`` (a training step starts), ``eval`` (an evaluation batch), ``save`` (a checkpoint is being
written) are the timed ones: a rank in them must beat again within the launcher's ``heartbeat_timeout``.
Before its first beat (start-up: process group, data, model, loading) and after ``done`` (training ended:
final save, report, shutdown) a rank is not watched.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

ENV = "MFTUNE_HEARTBEAT_FILE"
TIMED_PHASES = ("step", "eval", "save")
_RECORD_BYTES = 96  # one line, space-padded: rewritten in place, never longer than this


@dataclass(frozen=True)
class Beat:
    """One heartbeat record: when, at which global step and phase, from which process and main thread."""

    time: float
    step: int
    phase: str
    pid: int
    thread: int  # the main thread's id (threading.get_ident(); faulthandler prints it as "Thread 0x...")

    @property
    def timed(self) -> bool:
        return self.phase in TIMED_PHASES


class _Writer:
    """The open heartbeat file of this process (opened at the first beat) and the last step seen."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: str | None = None
        self.step = 0
        self.phase = ""

    def write(self, phase: str, step: int | None) -> None:
        path = os.environ.get(ENV)
        if not path:
            return
        if path != self.path:
            if self.fd is not None:
                os.close(self.fd)
            self.fd, self.path = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), path
        self.step = self.step if step is None else step
        self.phase = phase
        line = f"{time.time():.3f} {self.step} {phase} {os.getpid()} {threading.main_thread().ident}"
        os.pwrite(self.fd, line.ljust(_RECORD_BYTES - 1).encode()[:_RECORD_BYTES - 1] + b"\n", 0)


_WRITER = _Writer()


def beat(phase: str, step: int | None = None) -> None:
    """Record progress: ``phase`` (``step``, ``eval``, ``save``, ``done``) at global ``step`` (None: the last
    one given). A no-op outside the launcher."""
    _WRITER.write(phase, step)


@contextlib.contextmanager
def phase(name: str, step: int | None = None) -> Iterator[None]:
    """Beat ``name`` on entry and, on exit, return to the phase that was current (a save inside the loop goes
    back to ``step``, the final save after the loop back to ``done``; with none, to the untimed ``idle``)."""
    before = _WRITER.phase
    beat(name, step)
    try:
        yield
    finally:
        beat(before or "idle")  # "idle" (not timed): a phase entered before any step, e.g. run_mode eval


def heartbeat_path(log_dir: str, rank: int | str) -> str:
    return os.path.join(log_dir, f".heartbeat_{rank}")


def read_beat(path: str) -> Beat | None:
    """The record at ``path``; None when there is none yet or it cannot be parsed (a write in progress)."""
    try:
        with open(path, "rb") as f:
            fields = f.read(_RECORD_BYTES).decode("ascii", "replace").split()
        return Beat(float(fields[0]), int(fields[1]), fields[2], int(fields[3]), int(fields[4]))
    except (OSError, ValueError, IndexError):
        return None
