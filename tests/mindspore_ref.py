"""MindSpore as a test reference, run in its own interpreter (mftune never imports it).

The interpreter is ``$MFTUNE_MINDSPORE_PYTHON``, else ``/work/msenv/bin/python`` when it exists. A test
(or a fixture) that needs it calls ``mindspore_python()`` or ``run_mindspore(script, ...)``, and is
skipped when there is none or when it cannot import mindspore. Only tests/e2e uses this: it starts
processes, which the unit tier refuses.
"""
from __future__ import annotations

import functools
import os
import subprocess

import pytest

DEFAULT_PYTHON = "/work/msenv/bin/python"
ENV_VAR = "MFTUNE_MINDSPORE_PYTHON"


@functools.lru_cache(maxsize=None)
def _probe(python: str, module: str) -> str | None:
    """None when ``python`` imports ``module``, else why not (checked once per test session)."""
    if not os.path.isfile(python):
        return f"{python} does not exist"
    try:
        r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "GLOG_v": "3"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} cannot run: {e}"
    return None if r.returncode == 0 else f"{python} cannot import {module}: {r.stderr.strip()[-300:]}"


def reference_python(env_var: str, default: str, module: str, hint: str = "") -> str:
    """The interpreter of ``$env_var`` (else ``default`` when it exists) if it imports ``module``;
    otherwise pytest.skip saying why (``hint``: how to get one)."""
    python = os.environ.get(env_var) or (default if os.path.exists(default) else "")
    if not python:
        pytest.skip(f"{module} reference unavailable: set {env_var} to a Python with {module} installed{hint}")
    why = _probe(python, module)
    if why:
        pytest.skip(f"{module} reference unavailable: {why} (set {env_var})")
    return python


def run_reference(python: str, source: str, *args: str, timeout: int = 600, cwd: str | None = None) -> str:
    """Run ``source`` with ``python`` and ``args``; its stdout. A failure fails the test with the script's
    stderr (MindSpore's own warnings are not failures)."""
    env = {**os.environ, "GLOG_v": "3"}  # MindSpore's C++ log: errors only
    r = subprocess.run([python, "-c", source, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=env)
    assert r.returncode == 0, f"reference script failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r.stdout


def mindspore_python() -> str:
    """The interpreter with MindSpore, or pytest.skip saying why there is none."""
    return reference_python(ENV_VAR, DEFAULT_PYTHON, "mindspore")


def run_mindspore(script: str, *args: str, timeout: int = 600, cwd: str | None = None) -> str:
    """Run ``script`` (Python source) with the MindSpore interpreter and ``args``; its stdout."""
    return run_reference(mindspore_python(), script, *args, timeout=timeout, cwd=cwd)
