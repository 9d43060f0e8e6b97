"""Atomic writes: a reader sees the old file (or directory) or the new one, never a part of it.

Every file mftune writes for a user to keep (checkpoints, configs, datasets, adapters, JSON
records) goes through here. A file is written under a temporary sibling name, flushed to disk
(fsync), given the mode the umask allows (temporary files are created 0600), renamed onto its
name, and the folder entry is flushed; a crash leaves the previous version. A directory is written
in a private temporary folder next to it and renamed into place.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

UMASK = os.umask(0)
os.umask(UMASK)


def fsync_replace(tmp: str, path: str) -> None:
    """``os.replace(tmp, path)`` after flushing ``tmp`` to disk, then flush the folder entry."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary sibling name of ``path`` for the caller to write (``<path>.tmp.<pid>``); on
    success it is fsynced, given the umask's mode and renamed onto ``path``; on failure removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """``open`` for writing ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


@dataclass(frozen=True)
class Staging:
    path: str  # write the new directory here (not created yet); it replaces the target on success
    scratch: str  # private temporary space next to the target, removed afterwards


@contextlib.contextmanager
def atomic_directory(target: str, before_replace: Callable[[], None] | None = None) -> Iterator[Staging]:
    """``with atomic_directory(target) as stage``: write the new directory at ``stage.path``; on
    success it replaces ``target`` (an existing one is moved aside first, then removed), on failure
    ``target`` is unchanged. ``before_replace`` runs just before (e.g. to re-check the target)."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield Staging(os.path.join(work, "new"), work)
        if before_replace is not None:
            before_replace()
        if os.path.lexists(target):
            os.rename(target, os.path.join(work, "previous"))
        os.rename(os.path.join(work, "new"), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


# what atomic_path and atomic_directory leave behind when their process is killed
_TEMPORARY = re.compile(r"(\.tmp\.(?P<pid>\d+)$)|(^\..+\.tmp-[A-Za-z0-9_]+$)")


def stale_temporaries(folder: str, min_age_s: float = 60.0) -> list[str]:
    """mftune's own temporary files and folders under ``folder`` (``<name>.tmp.<pid>``, ``.<name>.tmp-XXXX``)
    that no live process on this host is writing: older than ``min_age_s`` and, when their name holds a pid,
    that process gone. A save in progress (this run's other ranks) is never one."""
    found, now = [], time.time()
    for directory, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            match = _TEMPORARY.search(name)
            path = os.path.join(directory, name)
            if not match or now - os.lstat(path).st_mtime < min_age_s:
                continue
            if match.group("pid") and _alive(int(match.group("pid"))):
                continue
            found.append(path)
        dirs[:] = [d for d in dirs if not _TEMPORARY.search(d)]
    return found


def remove_stale_temporaries(folder: str, min_age_s: float = 60.0) -> list[str]:
    """Remove ``stale_temporaries(folder)``; returns what was removed (missing folder: nothing)."""
    removed = []
    for path in stale_temporaries(folder, min_age_s) if os.path.isdir(folder) else []:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def rotate(path: str, keep: int = 5) -> str | None:
    """Move an existing ``path`` aside as ``<path>.1`` (``.1`` -> ``.2`` ... up to ``keep``; the oldest beyond
    is removed), as logrotate names them, so that a new run writing ``path`` loses nothing a previous run
    wrote there. Returns the name it was moved to, or None when ``path`` does not exist."""
    if not os.path.lexists(path):
        return None
    oldest = f"{path}.{keep}"
    if os.path.lexists(oldest):
        os.remove(oldest)
    for n in range(keep - 1, 0, -1):
        if os.path.lexists(f"{path}.{n}"):
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
    os.replace(path, f"{path}.1")
    return f"{path}.1"
