"""The unit tier runs in this one process: a test here that starts a process (a script, torchrun,
the launcher, a worker pool) belongs in tests/e2e or tests/distributed, and fails here saying so."""
from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests/unit runs in one process: move a test that starts processes to "
                             "tests/e2e (one process) or tests/distributed (several ranks)")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
