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
import shutil
import tempfile
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
