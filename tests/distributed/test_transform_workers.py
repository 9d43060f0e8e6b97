"""auto_trans_ckpt on two gloo ranks (spawned processes) when one rank's share of the transform fails:
both ranks stop with the error (rank 0 naming rank 1) instead of waiting, and the markers say what happened."""
import os

import pytest

from mftune.errors import CheckpointError

import tiny_checkpoints
from tiny_checkpoints import write_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def training_file(tmp_path):
    return tiny_checkpoints.training_file(tmp_path)


def _auto_transform_rank(rank, init_file, output_dir, src, results):
    """One of two gloo ranks running auto_transform; rank 1's share of the work fails."""
    import torch.distributed as dist

    import mftune.checkpoint.transform as engine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1:
        def broken(*args, **kwargs):
            raise OSError("No space left on device")
        engine.transform = broken
    try:
        engine.auto_transform(src, output_dir, rank=rank, world_size=2, process_num=2)
        results.put((rank, "ok"))
    except CheckpointError as exc:
        results.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_a_failing_worker_stops_every_rank(tmp_path, training_file):
    """auto_trans_ckpt with transform_process_num 2 on 2 ranks: rank 1's transform fails; both
    ranks raise (rank 0 naming rank 1) instead of waiting, and the markers say what happened."""
    import torch.multiprocessing as mp

    path, _, model = training_file
    out = tmp_path / "out"
    write_strategy(out / "strategy", model, 2, 0)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_auto_transform_rank, args=(r, str(tmp_path / "init"), str(out), path, results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = dict(results.get(timeout=60) for _ in range(2))  # a rank that died puts nothing: Empty
    assert "No space left on device" in got[1]
    assert "the checkpoint transform failed on rank 1" in got[0]
    done = out / "transformed_checkpoint" / "train"
    assert (done / "transform_succeed_rank_0.txt").exists()
    assert "No space left on device" in (done / "transform_failed_rank_1.txt").read_text()
