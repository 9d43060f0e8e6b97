"""Fault injection, for tests only: make one rank die or hang at a given training step.

``MFTUNE_FAULT="rank=1,step=3,kind=kill"`` makes global rank 1 kill itself with SIGKILL when it is about
to run global step 3 (steps 1-2 done); ``kind=hang`` makes it sleep forever there instead (a rank stuck
outside any collective), ``kind=error`` raises a RuntimeError. ``attempt=K`` (default 0) fires it only in
the K-th attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT``), so that a restarted job runs through.
The training loop calls ``inject_fault`` once per step; without ``MFTUNE_FAULT`` it returns at once.
tests/e2e/test_restart.py uses it to check the launcher's restarts and hang watchdog.
"""
from __future__ import annotations

import functools
import os
import signal
import time

ENV = "MFTUNE_FAULT"
KINDS = ("kill", "hang", "error")


@functools.cache
def _spec(text: str) -> dict[str, str | int]:
    """``"rank=1,step=3,kind=kill"`` -> its fields (rank, step, attempt as ints); ValueError if malformed."""
    fields = dict(item.split("=", 1) for item in text.split(",") if item.strip())
    spec: dict[str, str | int] = {"kind": fields.get("kind", ""), "attempt": 0}
    try:
        spec.update({k: int(fields[k]) for k in ("rank", "step")})
        spec["attempt"] = int(fields.get("attempt", 0))
    except (KeyError, ValueError):
        spec["kind"] = ""
    if spec["kind"] not in KINDS:
        raise ValueError(f"{ENV}={text!r} is invalid: expected rank=R,step=S,kind=kill|hang|error[,attempt=K]")
    return spec


def inject_fault(step: int) -> None:
    """Die or hang here when ``MFTUNE_FAULT`` names this rank, ``step`` (the step about to run) and attempt."""
    text = os.environ.get(ENV)
    if not text:
        return
    spec = _spec(text)
    here = (int(os.environ.get("RANK", "0")), step, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    if here != (spec["rank"], spec["step"], spec["attempt"]):
        return
    print(f"MFTUNE_FAULT: rank {here[0]} {spec['kind']} at step {step} (attempt {here[2]})", flush=True)
    if spec["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec["kind"] == "error":
        raise RuntimeError(f"{ENV}: injected error at step {step}")
    while True:  # hang: no progress, no collective, until someone kills this process
        time.sleep(3600)
