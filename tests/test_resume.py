"""--resume_training against the uninterrupted run: bitwise in one process (dropout on, so the
RNG state is restored too), within the multi-rank tolerance after a change of layout."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import parallel_parity as pp  # noqa: E402

DROPOUT = {"model.model_config.pet_config.lora_dropout": 0.1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("resume"))
    return d, pp.make_workdir(d)  # CheckpointMonitor saves at step 4 and at the end (6)


def _run(args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_one_process_resume_is_bitwise(workdir):
    d, config = workdir
    full, resumed = os.path.join(d, "full"), os.path.join(d, "resumed")
    _run(pp._args(config, "finetune", full, 1, 1, DROPOUT))
    ckpt_dir = os.path.join(full, "checkpoint")
    r = _run(pp._args(config, "finetune", resumed, 1, 1, DROPOUT) +
             ["--load_checkpoint", ckpt_dir, "--resume_training", "llama_7b_lora_rank_0-1_4"])
    assert "Resuming from" in r.stdout + r.stderr
    assert pp.losses(resumed) == pp.losses(full)[4:]  # steps 5 and 6, bit for bit
    assert pp.losses(resumed, "global_norm") == pp.losses(full, "global_norm")[4:]
    # resume_training True takes the newest step saved by every rank folder: the final one (6),
    # after which nothing is left to train
    again = os.path.join(d, "again")
    _run(pp._args(config, "finetune", again, 1, 1, DROPOUT) + ["--load_checkpoint", ckpt_dir,
                                                               "--resume_training", "True"])
    assert pp.losses(again) == []


def test_resume_on_another_layout(workdir):
    """Saved by 4 ranks (dp 2, mp 2, FSDP2 + sequence parallel + vocab-parallel), resumed by 2
    ranks (dp 1, mp 2, replicas): steps 5-6 match the one-process run."""
    d, config = workdir
    single, saved, resumed = (os.path.join(d, n) for n in ("single", "saved-2x2", "resumed-1x2"))
    _run(pp._args(config, "finetune", single, 1, 1, {}))
    order = " ".join(pp._args(config, "finetune", saved, 2, 2, pp.ALL_ON))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "4", str(pp.free_port()),
                        os.path.join(saved, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    options = dict(pp.ALL_OFF, load_checkpoint=os.path.join(saved, "checkpoint"),
                   resume_training="llama_7b_lora_rank_0-1_4")
    order = " ".join(pp._args(config, "finetune", resumed, 1, 2, options))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()),
                        os.path.join(resumed, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert pp.compare(pp.losses(single)[4:], pp.losses(resumed)) <= pp.RTOL
    assert pp.compare(pp.losses(single, "global_norm")[4:], pp.losses(resumed, "global_norm")) <= pp.RTOL
