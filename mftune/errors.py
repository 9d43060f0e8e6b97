"""The user-facing exception types and the exit status each one ends a command with.

Every command (run_finetune.py, the scripts, the launcher) turns these into one message on stderr
and the status below, never a traceback; anything else is a bug and keeps its traceback.

- 2: a mistake in the user's input (configuration, command line, checkpoint, data): fix it and
  run again. Messages read ``"<key or file>=<value> is invalid: <why>. <fix>"``.
- 1: the run cannot go on although the input was valid (training diverged), and the launcher's
  own usage errors (msrun_launcher.sh exits 1 on bad arguments; its users' scripts test for it).

A command catches ``UserError`` (and ``OSError``: a path it was given cannot be read or written),
``TrainingError`` where it trains, and ends with ``report``. ``MFTUNE_DEBUG=1`` (any value but empty, 0,
false, no, off) makes ``report`` print the traceback too, above the message: the one switch for every
command. No torch import here: the launcher reads this module before torchrun starts.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

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


class DiskSpaceError(UserError, OSError):
    """Not enough free space for a file about to be written, or a write that ran out of it (ENOSPC, EFBIG,
    EDQUOT): the message names the file or folder, the space needed or the failure, and the space free."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(message)
        self.errno = code


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


def debugging() -> bool:
    """Whether ``MFTUNE_DEBUG`` asks for tracebacks of user-facing errors (set and not 0/false/no/off)."""
    return os.environ.get("MFTUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def print_debug_traceback(exc: BaseException) -> None:
    """With ``MFTUNE_DEBUG`` set, the traceback of ``exc`` on stderr, including the exception it was raised
    while handling even where ``raise ... from None`` hides that from users (it is often the real cause);
    without it, nothing."""
    if not debugging():
        return
    lines = ["mftune: MFTUNE_DEBUG is set: the traceback of the error reported below\n"]
    context = exc.__context__
    if exc.__cause__ is None and exc.__suppress_context__ and context is not None:
        lines += traceback.format_exception(context)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    lines += traceback.format_exception(exc)
    print("".join(lines), file=sys.stderr, end="", flush=True)


def report(prog: str, exc: BaseException, *, fold: bool = False) -> int:
    """Print ``exc`` for the user of command ``prog`` on stderr, without a traceback (with one above it when
    ``MFTUNE_DEBUG`` is set), and return the command's exit status. ``fold``: the message on one line."""
    print_debug_traceback(exc)
    if isinstance(exc, ConfigError):
        text = str(exc)  # already "mftune: N configuration error(s) ..." with one line each
    else:
        label = "training stopped" if isinstance(exc, TrainingError) else "error"
        text = f"{prog}: {label}: {one_line(exc) if fold else message(exc)}"
    print(text, file=sys.stderr)
    return exit_status(exc)


def message(exc: BaseException) -> str:
    """What the user reads of ``exc``: its message; for a bare ``OSError`` about a path (one that mftune did not
    word itself) the path first, the reason, and the usual fix (``[Errno 20] Not a directory: 'out/x'`` reads
    ``out is a file where a folder is needed (Not a directory: out/x). Pass a folder path, or move the file.``)."""
    if not isinstance(exc, OSError) or isinstance(exc, UserError) or exc.filename is None:
        return str(exc)
    path = os.fsdecode(exc.filename)
    blocker = _file_in_the_way(path) if exc.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker:
        return (f"{blocker} is a file where a folder is needed ({exc.strerror}: {path}). Pass a folder path, or "
                f"move the file.")
    fix = _OS_FIXES.get(exc.errno, "Check the path")
    return f"{path}: {exc.strerror or exc}. {fix}."


_OS_FIXES = {errno.ENOENT: "Check the path: it does not exist", errno.EISDIR: "Pass a file, not a folder",
             errno.EACCES: "Pass a path you may read (and write, for an output)", errno.EPERM: "Check its permissions",
             errno.EROFS: "Write the output elsewhere", errno.ENOSPC: "Free space there or write to another disk"}


def _file_in_the_way(path: str) -> str | None:
    """The first of ``path`` and its parents that exists and is not a folder (what makes creating it fail)."""
    while path and path != os.path.dirname(path):
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
        path = os.path.dirname(path)
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` (``message``) with its white space folded onto one line (the scripts' format)."""
    return " ".join(message(exc).split())
