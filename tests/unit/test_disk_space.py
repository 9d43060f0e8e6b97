"""Disk space (issue 14, item 4).

A save estimates its bytes and checks the free space before writing (free space faked with a
monkeypatched ``shutil.disk_usage``); a write that fails for want of space (a real EFBIG: this process's
file size limit lowered for the duration of one save) is a CheckpointError naming the file and the free
space, with the partial file removed and meta.json and the earlier checkpoint untouched. The same failures
in a real run, and on one rank of two, are tests/e2e/test_disk_full.py and
tests/distributed/test_disk_full_ranks.py.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import shutil
import signal
import sys

import pytest
import torch

from mftune.checkpoint.transform import transform
from mftune.errors import CheckpointError, DiskSpaceError, UserError
from mftune.fileio import atomic_path, check_free_space, disk_full, with_margin
from mftune.trainer.checkpointing import CheckpointMonitor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_checkpoints import tiny_model, training_file  # noqa: E402

Usage = collections.namedtuple("Usage", "total used free")


def _fake_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def _saver(tmp_path, **kwargs):
    model = tiny_model(lora=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    saver = CheckpointMonitor(str(tmp_path), "llama", **kwargs)

    def save(step: int) -> str:
        return saver.save(model, optimizer, epoch=1, step_in_epoch=step, global_step=step, loss_scale=1.0,
                          global_batch_size=8, model_config={"hidden_size": 32},
                          extra_metadata={"run_mode": "finetune"})
    return saver, save


def _state(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_the_estimate_covers_every_file_of_a_save(tmp_path):
    saver, save = _saver(tmp_path, save_network_params=True, save_trainable_params=True)
    needs = []
    check = saver._check_space
    saver._check_space = lambda need, step: (needs.append(need), check(need, step))
    save(2)
    files = [os.path.join(d, f) for d in (saver.dir, saver.network_dir, saver.trainable_dir) for f in os.listdir(d)
             if f.endswith(".safetensors")]
    written = sum(os.path.getsize(f) for f in files)
    assert len(files) == 3 and written <= needs[0] <= 1.1 * written + 16384, (written, needs)


def test_not_enough_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    saver, save = _saver(tmp_path)
    previous = save(2)
    before = _state(saver.dir)
    _fake_free(monkeypatch, 5000)
    with pytest.raises(CheckpointError) as err:
        save(4)
    assert str(err.value) == (
        f"not enough disk space to save step 4 to {saver.dir}: needs ~{with_margin(0) / 1e6:.3g} MB, 5 kB free. "
        f"Free space or set keep_checkpoint_max lower; the previous checkpoint {previous} is intact.")
    assert _state(saver.dir) == before and saver.written == [previous] and saver.last_step == 2
    _fake_free(monkeypatch, 10**9)
    assert save(4).endswith("-1_4.safetensors")  # space again: saving goes on


def test_first_save_names_the_meta_of_an_earlier_run_or_none(tmp_path, monkeypatch):
    _, save = _saver(tmp_path)
    earlier = save(2)
    _fake_free(monkeypatch, 0)
    with pytest.raises(CheckpointError, match=f"the previous checkpoint {earlier} is intact"):
        _saver(tmp_path)[1](4)  # a new run (resumed) into the same folder: meta.json names the last one
    with pytest.raises(CheckpointError, match="0 B free. .* no checkpoint was saved in .*rank_0 before"):
        _saver(tmp_path / "fresh")[1](2)


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG in this process (the soft limit; SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path):
    saver, save = _saver(tmp_path, keep_checkpoint_max=1)
    previous = save(2)
    before = _state(saver.dir)
    with _file_size_limit(os.path.getsize(previous) // 2), pytest.raises(CheckpointError) as err:
        save(4)
    message = str(err.value)
    assert message.startswith(f"not enough disk space to save step 4: writing "
                              f"{os.path.join(saver.dir, 'llama_rank_0-1_4.safetensors')} failed "
                              f"(File too large (a file size limit: ulimit -f)); ")
    assert f"free in {saver.dir}, this rank's files of the step take ~" in message
    assert "The partial file was removed." in message
    assert message.endswith(f"Free space or set keep_checkpoint_max lower; the previous checkpoint {previous} "
                            f"is intact.")
    # no temporary file, meta.json and the step-2 file as they were: keep_checkpoint_max=1 pruned nothing
    assert _state(saver.dir) == before and saver.written == [previous]


def test_atomic_writes_name_the_file_when_the_disk_is_full(tmp_path):
    path = str(tmp_path / "out.bin")
    causes = [OSError(errno.ENOSPC, "No space left on device"),
              RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")]
    for cause in causes:  # an OSError, or safetensors' SafetensorError (not an OSError) saying so
        with pytest.raises(DiskSpaceError) as err, atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 100)
            raise cause
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, (OSError, UserError))
        assert str(err.value).startswith(f"writing {path} failed: No space left on device; ")
        assert f"free in {tmp_path}. The partial file was removed." in str(err.value)
        assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError), atomic_path(path) as tmp:  # anything else passes unchanged
        raise ValueError("a bug")
    assert disk_full(OSError(errno.EFBIG, "File too large")) and not disk_full(OSError(errno.EACCES, "denied"))


def test_tools_check_the_space_before_writing(tmp_path, monkeypatch):
    src, _, _ = training_file(tmp_path)
    _fake_free(monkeypatch, 5000)
    rank_dir = tmp_path / "out" / "train" / "rank_0"
    with pytest.raises(DiskSpaceError, match=rf"^not enough disk space to write the transformed checkpoint of "
                                              rf"rank 0 \(checkpoint_0.safetensors\) to {rank_dir}: needs ~16.9 MB, "
                                              rf"5 kB free\. "):
        transform(src, str(tmp_path / "out"), None, [0])
    assert os.listdir(rank_dir) == []
    with pytest.raises(DiskSpaceError, match="needs ~1.02 GB, 5 kB free"):
        check_free_space(str(tmp_path / "not" / "yet"), 10**9, "x")  # a folder to be created: its ancestor's
