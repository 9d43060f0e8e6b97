"""Logging in MindFormers' layout: stdout ``time - mftune[file:line] - LEVEL - msg`` and
``<output_dir>/log/rank_<r>/info.log``; progress of long tool runs (``with_progress``)."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable

FORMAT = "%(asctime)s - mftune[%(filename)s:%(lineno)d] - %(levelname)s - %(message)s"
logger = logging.getLogger("mftune")

Progress = Callable[[Iterable, int], Iterable]  # (items, total) -> the same items, e.g. tqdm


def with_progress(progress: Progress | None, items: Iterable, total: int) -> Iterable:
    """``items`` through ``progress`` (a bar), or as they are without one."""
    return items if progress is None else progress(items, total)


class _Early(logging.Handler):
    """Keeps what is logged before the output directory is known (config loading), so that
    ``info.log`` gets it too."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def log_file(output_dir: str, rank: int = 0) -> str:
    """``<output_dir>/log/rank_<rank>/info.log``: where rank ``rank`` of a run logs (appended to; a new run
    moves an earlier run's aside first, ``mftune.trainer.outputs``)."""
    return os.path.join(output_dir, "log", f"rank_{rank}", "info.log")


def setup_logging(output_dir: str | None = None, rank: int = 0) -> logging.Logger:
    """Configure the ``mftune`` logger once per process (idempotent); rank > 0 logs warnings only."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    early: list[logging.LogRecord] = []
    for handler in list(logger.handlers):
        if getattr(handler, "_mftune", False):
            if isinstance(handler, _Early):
                early = handler.records
            logger.removeHandler(handler)
            handler.close()
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [stream]
    if output_dir:
        path = log_file(output_dir, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter(FORMAT))
        for record in early:
            file_handler.handle(record)
        handlers.append(file_handler)
    else:
        handlers.append(_Early())
    for handler in handlers:
        if not handler.formatter:
            handler.setFormatter(logging.Formatter(FORMAT))
        handler._mftune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger
