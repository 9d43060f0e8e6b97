"""Atomic writes: a reader sees the old file (or directory) or the new one, never a part of it.

Every file mftune writes for a user to keep (checkpoints, configs, datasets, adapters, JSON
records) goes through here. A file is written under a temporary sibling name, flushed to disk
(fsync), given the mode the umask allows (temporary files are created 0600), renamed onto its
name, and the folder entry is flushed; a crash leaves the previous version. A directory is written
in a private temporary folder next to it and renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from mftune.errors import DiskSpaceError

UMASK = os.umask(0)
os.umask(UMASK)


def _boot_id() -> str:
    """This boot of this machine (Linux): containers given the same hostname on different machines, or one
    machine after a reboot (pids reused), still differ."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# in temporary names: whose pid it is; host_id() for the ranks of one machine
HOST = hashlib.sha1(f"{socket.gethostname()}\n{_boot_id()}".encode()).hexdigest()[:8]


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
    """A temporary sibling name of ``path`` for the caller to write (``<path>.tmp.<host>-<pid>``); on
    success it is fsynced, given the umask's mode and renamed onto ``path``; on failure removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{HOST}-{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        fsync_replace(tmp, path)
    except Exception as exc:
        if os.path.exists(tmp):  # first: the free space reported is what the partial file took
            os.remove(tmp)
        if disk_full(exc) and not isinstance(exc, DiskSpaceError):
            raise _out_of_space(path, exc) from exc
        raise
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
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{HOST}-{os.getpid()}-", dir=parent)
    try:
        yield Staging(os.path.join(work, "new"), work)
        if before_replace is not None:
            before_replace()
        if os.path.lexists(target):
            os.rename(target, os.path.join(work, "previous"))
        os.rename(os.path.join(work, "new"), target)
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)  # first: the free space reported is what the partial files took
        if disk_full(exc) and not isinstance(exc, DiskSpaceError):
            raise _out_of_space(target, exc) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


# what atomic_path and atomic_directory leave behind when their process is killed: <name>.tmp.<host>-<pid> and
# .<name>.tmp-<host>-<pid>-XXXX (earlier versions: <name>.tmp.<pid>, .<name>.tmp-XXXX)
_TEMPORARY = re.compile(r"(\.tmp\.(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)$)|"
                        r"(^\..+\.tmp-(?:(?P<dhost>[0-9a-f]{8})-(?P<dpid>\d+)-)?[A-Za-z0-9_]+$)")


def stale_temporaries(folder: str, min_age_s: float = 60.0) -> list[str]:
    """mftune's own temporary files and folders under ``folder`` that no live process is writing: those this
    host's processes wrote (their name holds the host and the pid) once that process is gone, at any age (a
    restart a second after a kill finds them); others (another host's, on a shared filesystem, or an earlier
    version's names) once older than ``min_age_s`` and, when their name holds only a pid, that process gone.
    A save in progress (this run's other ranks) is never one."""
    found, now = [], time.time()
    for directory, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            match = _TEMPORARY.search(name)
            path = os.path.join(directory, name)
            if match and _stale(match, now - os.lstat(path).st_mtime, min_age_s):
                found.append(path)
        dirs[:] = [d for d in dirs if not _TEMPORARY.search(d)]
    return found


def _stale(match: re.Match, age: float, min_age_s: float) -> bool:
    host, pid = match.group("host") or match.group("dhost"), match.group("pid") or match.group("dpid")
    if host == HOST:
        return not _alive(int(pid))
    if age < min_age_s:
        return False
    return host is not None or pid is None or not _alive(int(pid))  # another host's: by age alone


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


# ----------------------------------------------------------------------------------------------
# disk space
# ----------------------------------------------------------------------------------------------

# what a full disk (ENOSPC), a file size limit (EFBIG) or a quota (EDQUOT) raises: OSError, or the message of
# a library's own error (safetensors' SafetensorError: "I/O error: No space left on device (os error 28)")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (%s)\b"
                             % "|".join(str(n) for n in sorted(DISK_FULL_ERRNOS)))
# what a save needs beyond its estimated bytes: file system blocks, the small JSON files written beside it,
# a log that grows meanwhile
MARGIN_FRACTION, MARGIN_BYTES = 0.02, 16 * 2**20


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space (full disk, file size limit, quota)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return bool(_DISK_FULL_TEXT.search(str(exc)))


def free_bytes(folder: str) -> int:
    """Free bytes for an unprivileged user on the file system of ``folder`` (or of its nearest existing
    ancestor, for a folder not created yet)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def with_margin(need_bytes: int) -> int:
    """``need_bytes`` plus the margin a write is checked with (2 %, at least 16 MiB)."""
    return need_bytes + max(int(need_bytes * MARGIN_FRACTION), MARGIN_BYTES)


def human_bytes(n: float) -> str:
    """``1.2 GB``, ``340 MB``, ``12 kB`` (powers of 1000, as ``df -H`` and file managers show them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def specs_bytes(specs) -> int:
    """The data bytes of the tensors that ``(name, dtype, shape)`` specs describe (a torch dtype's itemsize)."""
    total = 0
    for _, dtype, shape in specs:
        count = 1
        for n in shape:
            count *= n
        total += count * dtype.itemsize
    return total


def check_free_space(folder: str, need_bytes: int, what: str) -> None:
    """DiskSpaceError when the file system of ``folder`` has less free space than ``need_bytes`` (the size of
    ``what``, about to be written there) plus the margin (``with_margin``); nothing is written before."""
    free, need = free_bytes(folder), with_margin(need_bytes)
    if need > free:
        raise DiskSpaceError(f"not enough disk space to write {what} to {folder}: needs ~{human_bytes(need)}, "
                             f"{human_bytes(free)} free. Free space there or write to another disk.")


def _out_of_space(path: str, exc: BaseException) -> DiskSpaceError:
    """The error for a write of ``path`` that failed for want of space; the partial file is gone."""
    folder = os.path.dirname(os.path.abspath(path))
    return DiskSpaceError(f"writing {path} failed: {disk_full_reason(exc)}; {human_bytes(free_bytes(folder))} "
                          f"free in {folder}. The partial file was removed. Free space there or write to "
                          f"another disk.", disk_full_errno(exc))


def disk_full_errno(exc: BaseException) -> int:
    """ENOSPC, EFBIG or EDQUOT: the one ``exc`` (a ``disk_full`` error) stands for (a library's message quotes
    it as Rust's ``(os error 27)``)."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    return code if code in DISK_FULL_ERRNOS else errno.ENOSPC


def disk_full_reason(exc: BaseException) -> str:
    """``No space left on device``, ``File too large (a file size limit: ulimit -f)`` or ``Disk quota exceeded``."""
    code = disk_full_errno(exc)
    return os.strerror(code) + (" (a file size limit: ulimit -f)" if code == errno.EFBIG else "")
