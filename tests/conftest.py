"""Shared pytest fixtures."""
from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def mftune_logs_reach_caplog(monkeypatch):
    """Let ``mftune`` log records propagate to the root logger, where ``caplog`` listens.

    ``mftune.log.setup_logging`` (run by the trainer, and by tests that use it) turns propagation
    off; without this fixture a caplog assertion would pass or fail depending on test order.
    monkeypatch restores the previous value after each test.
    """
    monkeypatch.setattr(logging.getLogger("mftune"), "propagate", True)
