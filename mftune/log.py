"""Logging in MindFormers' layout: stdout ``time - mftune[file:line] - LEVEL - msg`` and
``<output_dir>/log/rank_<r>/info.log``."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s - mftune[%(filename)s:%(lineno)d] - %(levelname)s - %(message)s"
logger = logging.getLogger("mftune")


def setup_logging(output_dir: str | None = None, rank: int = 0) -> logging.Logger:
    """Configure the ``mftune`` logger once per process (idempotent); rank > 0 logs warnings only."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_mftune", False):
            logger.removeHandler(handler)
            handler.close()
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [stream]
    if output_dir:
        log_dir = os.path.join(output_dir, "log", f"rank_{rank}")
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, "info.log")))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._mftune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger
