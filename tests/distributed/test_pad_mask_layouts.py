"""Pad ids inside the inputs (``mask_pad_token``, on for the parity config: pad 0, bos 1, eos 2) in the
parallel layouts against one process: the key mask is built from the full token rows, so it follows
tensor and sequence parallelism (which shard the sequence only between attention blocks), FSDP2, the
vocabulary-parallel loss, recompute and packing.

Expected numbers: a one-process run of the same config, data and seed (tests/parity.py; tolerance
``pp.RTOL``). The data are the parity records with 6 pad ids put inside each input; with
``mask_pad_token: False`` the same one-process run moves the loss by ~1e-3 and the gradient norm by
~8e-2 (measured), so the comparison bites; the rule is logged once when on. Measured on every parity layout (8x1, 4x2, 2x4 with
gradient accumulation, 1x8, 4x1, 2x2, 1x4): within 1.2e-7 relative; this file runs three of them.
"""
import os
import subprocess
import sys

import datasets
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

from mftune.data.packing import pack_dataset  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The parity workdir with pad ids inside every record (``data``) and those records cut and packed."""
    d = str(tmp_path_factory.mktemp("pad_layouts"))
    config = pp.make_workdir(d)
    ds = datasets.load_from_disk(os.path.join(d, "data"))
    ids, labels = torch.tensor(ds["input_ids"]), ds["labels"]
    g = torch.Generator().manual_seed(5)
    for row in ids:  # labels unchanged: some targets now follow a pad input
        row[torch.randperm(pp.SEQ - 2, generator=g)[:6] + 1] = 0
    datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels}).save_to_disk(os.path.join(d, "pads"))
    lengths = [20 + (7 * i) % 41 for i in range(len(ids))]
    samples = datasets.Dataset.from_dict({"input_ids": [r[:n] for r, n in zip(ids.tolist(), lengths)],
                                          "labels": [[-100] + r[1:n] for r, n in zip(labels, lengths)]})
    pack_dataset(samples, pp.SEQ + 1, 0).save_to_disk(os.path.join(d, "pads-packed"))
    return d, config


def _single(config: str, out: str, options: dict) -> list[list[float]]:
    """(losses, gradient norms) of a one-process run."""
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):  # each dataset's reference runs once
        r = subprocess.run([sys.executable, *pp._args(config, "finetune", out, 1, 1, options)], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return [pp.losses(out), pp.losses(out, "global_norm")]


@pytest.mark.parametrize("data, dp, mp", [
    ("pads", 2, 2),  # FSDP2, sequence parallel, vocabulary-parallel loss, recompute (pp.ALL_ON)
    ("pads", 1, 4),  # tensor + sequence parallel only
    ("pads-packed", 2, 2),  # packed samples with pads inside: the SDPA block mask
])
def test_pad_mask_layout_matches_one_process(workdir, data, dp, mp):
    d, config = workdir
    opts = {"train_dataset_dir": os.path.join(d, data)}
    expected = _single(config, os.path.join(d, f"{data}-single"), opts)
    out = os.path.join(d, f"{data}-{dp}x{mp}")
    r = pp.run_layout(config, "finetune", out, dp, mp, dict(pp.ALL_ON, **opts))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = [pp.losses(out), pp.losses(out, "global_norm")]
    assert pp.compare(expected[0], got[0]) <= pp.RTOL and pp.compare(expected[1], got[1]) <= pp.RTOL, (expected, got)


def test_the_data_bite(workdir):
    """With the rule off the same one-process run differs far beyond the tolerance."""
    d, config = workdir
    opts = {"train_dataset_dir": os.path.join(d, "pads")}
    on = _single(config, os.path.join(d, "pads-single"), opts)
    off = _single(config, os.path.join(d, "pads-off"), dict(opts, **{"model.model_config.mask_pad_token": False}))
    assert pp.compare(on[0], off[0]) > 100 * pp.RTOL and pp.compare(on[1], off[1]) > 100 * pp.RTOL
    line = "mask_pad_token: inputs equal to pad_token_id=0 are hidden from attention and not trained on"
    logs = [open(os.path.join(d, run, "log", "rank_0", "info.log")).read() for run in ("pads-single", "pads-off")]
    assert logs[0].count(line) == 1 and line not in logs[1]  # logged once at start, only when active
