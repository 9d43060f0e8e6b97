"""The user-facing exception types and the exit status each one ends a command with.

Every command (run_finetune.py, the scripts, the launcher) turns these into one message on stderr
and the status below, never a traceback; anything else is a bug and keeps its traceback.

- 2: a mistake in the user's input (configuration, command line, checkpoint, data): fix it and
  run again. Messages read ``"<key or file>=<value> is invalid: <why>. <fix>"``.
- 1: the run cannot go on although the input was valid (training diverged), and the launcher's
  own usage errors (msrun_launcher.sh exits 1 on bad arguments; its users' scripts test for it).

A command catches ``UserError`` (and ``OSError``: a path it was given cannot be read or written),
``TrainingError`` where it trains, and ends with ``report``. No torch import here: the launcher
reads this module before torchrun starts.
"""
from __future__ import annotations

import sys

USER_MISTAKE = 2
CANNOT_GO_ON = 1


class UserError(Exception):
    """A mistake in the user's input, reported as one message without a traceback."""

    exit_status = USER_MISTAKE


class ConfigError(UserError):
    """Every problem found in a configuration; each one ``"<key>=<value> is invalid: <why>. <fix>"``."""

    def __init__(self, errors: list[str], path: str | None = None):
        self.errors = list(errors)
        self.path = path
        super().__init__(format_errors(self.errors, path))


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: the message names the file, the tensor and the fix."""


class DataError(UserError, ValueError):
    """A mistake in the user's data or data arguments (file, record, dataset directory)."""


class RecordError(DataError):
    """Record ``index`` (0-based, in ``file``) is malformed at ``field``."""

    def __init__(self, index: int, field: str, why: str, file: str | None = None):
        self.index, self.field, self.why, self.file = index, field, why, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}record {self.index}: field '{self.field}' {self.why}"


class UsageError(UserError):
    """Mistakes in the launcher's arguments, one ``"<ARG>=<value> is invalid: <why>. <fix>"`` line each."""

    exit_status = CANNOT_GO_ON  # msrun_launcher.sh's status for bad arguments

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); reported without a traceback."""

    exit_status = CANNOT_GO_ON


def format_errors(errors: list[str], path: str | None = None) -> str:
    """``mftune: N configuration error(s) in FILE:`` then one ``  - message`` line per error."""
    where = f" in {path}" if path else ""
    return "\n".join([f"mftune: {len(errors)} configuration error(s){where}:"]
                     + [f"  - {e}" for e in errors])


def exit_status(exc: BaseException) -> int:
    """The status a command ends with after ``exc``: its type's, 2 for an ``OSError`` (a path the user
    gave), 1 for anything else."""
    if isinstance(exc, OSError):
        return USER_MISTAKE
    return getattr(exc, "exit_status", CANNOT_GO_ON)


def report(prog: str, exc: BaseException, *, fold: bool = False) -> int:
    """Print ``exc`` for the user of command ``prog`` on stderr, without a traceback, and return the
    command's exit status. ``fold``: the message on one line."""
    if isinstance(exc, ConfigError):
        text = str(exc)  # already "mftune: N configuration error(s) ..." with one line each
    else:
        label = "training stopped" if isinstance(exc, TrainingError) else "error"
        text = f"{prog}: {label}: {one_line(exc) if fold else exc}"
    print(text, file=sys.stderr)
    return exit_status(exc)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` with its white space folded onto one line (the scripts' format)."""
    return " ".join(str(exc).split())
