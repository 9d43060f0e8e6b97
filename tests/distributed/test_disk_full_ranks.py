"""A full disk on one rank of two during a save (issue 14, item 4): every rank stops at that save with exit
status 2 instead of the healthy one training on into a hang; rank 1 names the file it could not write, rank 0
names rank 1, and neither keeps a file of that step (no meta.json, no temporary file).

The fault is injected into rank 1 alone by a ``sitecustomize`` module on PYTHONPATH (read by every Python
process at start-up; it acts only where RANK=1): ``os.fsync`` of a checkpoint's temporary file fails with
ENOSPC, as it does on file systems that report a full disk only when the data is flushed (NFS, delayed
allocation). The one-process faults are tests/e2e/test_disk_full.py's.
"""
from __future__ import annotations

import os
import subprocess

import parity as pp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITECUSTOMIZE = '''
import errno, os
if os.environ.get("RANK") == "1":
    _fsync = os.fsync

    def fsync(fd):
        if ".safetensors.tmp." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return _fsync(fd)

    os.fsync = fsync
'''


def test_a_full_disk_on_one_rank_stops_every_rank(tmp_path):
    config, out = pp.make_workdir(str(tmp_path)), str(tmp_path / "out")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env.pop("MFTUNE_DEBUG", None)
    order = " ".join(pp._args(config, "finetune", out, 2, 1, {}))
    logs = os.path.join(out, "msrun_log")
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()), logs, "True", "120"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=400)
    console = r.stdout + r.stderr
    assert r.returncode != 0 and "rank 0 failed (exit 2)" in console and "rank 1 failed (exit 2)" in console, \
        console[-3000:]
    ckpt = os.path.join(out, "checkpoint")
    worker = [open(os.path.join(logs, f"worker_{rank}.log")).read() for rank in (0, 1)]
    assert "Traceback" not in worker[0] + worker[1]
    failed = os.path.join(ckpt, "rank_1", "llama_7b_lora_rank_1-1_4.safetensors")
    assert f"mftune: error: not enough disk space to save step 4: writing {failed} failed (No space left on device)" \
           in worker[1] and "no checkpoint was saved in" in worker[1], worker[1][-2000:]
    assert f"mftune: error: rank 1 ran out of disk space saving step 4 to {os.path.join(ckpt, 'rank_1')}" in worker[0]
    assert "step:[    4/    6]" in worker[0] and "step:[    5/    6]" not in worker[0]  # stopped at the save
    assert os.listdir(os.path.join(ckpt, "rank_0")) == [] and os.listdir(os.path.join(ckpt, "rank_1")) == []
