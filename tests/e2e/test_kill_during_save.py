"""kill -9 at fixed moments of a tiny LoRA run, then ``--resume_training True`` (issue 14, item 7).

Two moments (tests/kill_runs.py; bench/kill_trials.py runs random ones, between saves too): inside a
checkpoint's tensor write (SIGKILL when its temporary file appears) and inside the write of meta.json (the file
is complete, its mark is not). A moment that the watcher misses (the write ended before the signal landed) is
tried again at a later save. Each must lose no checkpoint (the
one meta.json names is intact), and the rerun must reproduce the uninterrupted run bit for bit: every step's
loss after the resume point and every tensor of the final checkpoint (adapters, AdamW moments, counters, RNG).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kill_runs as kr  # noqa: E402

MOMENTS = {  # id -> (the kills to try in turn, what the kill must have interrupted)
    "checkpoint_write": ([kr.Kill("file", s) for s in (6, 12, 18)], "writing ckpt"),
    "meta_json_write": ([kr.Kill("meta", s) for s in (9, 15, 21)], "writing meta.json"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("kill"))
    config = kr.setup(d)
    ref = kr.reference(config, os.path.join(d, "reference"))
    out = {}
    for name, (kills, where) in MOMENTS.items():
        out[name] = _first_hit(config, os.path.join(d, name), kills, where, ref)
    return out


def _first_hit(config, out, kills, where, ref) -> kr.Trial:
    for i, kill in enumerate(kills):
        t = kr.trial(config, f"{out}-{i}", kill, ref)
        if t.where.startswith(where):
            break
    return t


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_loses_nothing_and_the_rerun_is_bit_identical(runs, moment):
    t = runs[moment]
    assert t.killed and t.where.startswith(MOMENTS[moment][1]), t
    assert not t.lost, t.lost
    assert t.status == 0 and t.resumed_from, t  # resumed from a checkpoint, not started again
    assert t.compared_steps > 0 and not t.loss_diff, t
    assert not t.tensor_diff, t.tensor_diff


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_the_next_start_removes_what_the_kill_left(runs, moment):
    """At once: the rerun starts within seconds of the kill, and the name says the writer was this host's."""
    t = runs[moment]
    assert t.left, t  # the kill left a temporary file to remove
    assert not t.leftover, t.leftover
