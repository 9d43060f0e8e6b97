"""A run never overwrites what an earlier run wrote in its output_dir (issue 14, item 4): the files a run mode
writes are moved to *.1 (.2 .. .5) when the next run starts (mftune.trainer.outputs), rank 0 the shared ones,
every rank its own log; the real runs are tests/e2e/test_disk_full.py's."""
from __future__ import annotations

import logging
import os

import pytest

from mftune.config.cli import parse_cli
from mftune.parallel.mesh import ParallelContext
from mftune.trainer.main import _prepare_output_dir
from mftune.trainer.monitor import fresh_metrics_file
from mftune.trainer.outputs import run_outputs, set_aside_previous_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA_7B = os.path.join(ROOT, "configs", "llama2", "lora_llama2_7b.yaml")
SHARED = ["resolved_config.yaml", "metrics.jsonl", "loss_curve.png", "run_summary.json", "eval_metrics.jsonl",
          "predict_results.jsonl", "eval_results.json"]


@pytest.fixture
def mftune_logger():
    """setup_logging reconfigures the 'mftune' logger (handlers, propagation): put it back afterwards."""
    lg = logging.getLogger("mftune")
    saved = list(lg.handlers), lg.propagate, lg.level
    yield lg
    for handler in lg.handlers:
        if handler not in saved[0]:
            handler.close()
    lg.handlers[:] = saved[0]
    lg.propagate, lg.level = saved[1], saved[2]


def _previous_run(out, tag: str) -> None:
    """The files an earlier run left in ``out`` (each holding ``tag``), logs of ranks 0 and 1 included."""
    for name in SHARED + ["log/rank_0/info.log", "log/rank_1/info.log"]:
        os.makedirs(os.path.dirname(out / name), exist_ok=True)
        (out / name).write_text(f"{tag} {name}\n")


def _cfg(out, *extra: str):
    return parse_cli(["--config", LORA_7B, "--output_dir", str(out), *extra], check_files=False)


def test_a_new_run_moves_the_previous_runs_files_aside(tmp_path, mftune_logger):
    out = tmp_path / "out"
    _previous_run(out, "first")
    _prepare_output_dir(_cfg(out, "--run_mode", "finetune"), ParallelContext())
    # what a finetune run writes: moved, each with the earlier run's content
    moved = ["resolved_config.yaml", "metrics.jsonl", "loss_curve.png", "run_summary.json", "eval_metrics.jsonl",
             "log/rank_0/info.log"]
    for name in moved:
        assert (out / f"{name}.1").read_text() == f"first {name}\n"
    # another run mode's files and another rank's log are not this run's to move
    for name in ["predict_results.jsonl", "eval_results.json", "log/rank_1/info.log"]:
        assert (out / name).read_text() == f"first {name}\n" and not (out / f"{name}.1").exists()
    assert not (out / "metrics.jsonl").exists() and not (out / "run_summary.json").exists()
    assert (out / "resolved_config.yaml").read_text().startswith("# Resolved mftune configuration")
    log = (out / "log/rank_0/info.log").read_text()
    assert "first" not in log and log.count("were moved to *.1") == 1
    assert "resolved_config.yaml, metrics.jsonl, loss_curve.png, run_summary.json, eval_metrics.jsonl, " \
           "log/rank_0/info.log" in log

    # the next (failing, or any) run: .1 -> .2, nothing overwritten
    _prepare_output_dir(_cfg(out, "--run_mode", "predict"), ParallelContext())
    assert (out / "resolved_config.yaml.2").read_text() == "first resolved_config.yaml\n"
    assert (out / "resolved_config.yaml.1").read_text().startswith("# Resolved mftune configuration")
    assert (out / "predict_results.jsonl.1").read_text() == "first predict_results.jsonl\n"
    assert (out / "metrics.jsonl.1").read_text() == "first metrics.jsonl\n"  # not a predict run's file
    assert "first log/rank_0/info.log" in (out / "log/rank_0/info.log.2").read_text()


def test_other_ranks_move_only_their_own_log(tmp_path, mftune_logger):
    out = tmp_path / "out"
    _previous_run(out, "first")
    _prepare_output_dir(_cfg(out, "--run_mode", "finetune"), ParallelContext(rank=1, world_size=2))
    assert (out / "log/rank_1/info.log.1").read_text() == "first log/rank_1/info.log\n"
    assert sorted(p for p in os.listdir(out) if p.endswith(".1")) == []  # rank 0's files stay for rank 0
    log = (out / "log/rank_1/info.log").read_text()
    assert "were moved to *.1 (older ones to .2 .. .5): log/rank_1/info.log" in log


def test_five_earlier_versions_are_kept(tmp_path):
    for n in range(7):
        (tmp_path / "resolved_config.yaml").write_text(f"run {n}")
        assert set_aside_previous_run(str(tmp_path), 0, ["resolved_config.yaml"]) == ["resolved_config.yaml"]
    assert [(tmp_path / f"resolved_config.yaml.{k}").read_text() for k in range(1, 6)] == [
        "run 6", "run 5", "run 4", "run 3", "run 2"]
    assert not (tmp_path / "resolved_config.yaml.6").exists()
    assert set_aside_previous_run(str(tmp_path / "new"), 0, ["resolved_config.yaml"]) == []  # nothing there yet


def test_outputs_by_run_mode_and_the_monitor_own_rotation(tmp_path):
    assert run_outputs("predict") == ["resolved_config.yaml", "predict_results.jsonl"]
    assert run_outputs("eval") == ["resolved_config.yaml", "eval_results.json"]
    assert run_outputs("finetune", only_save_strategy=True) == ["resolved_config.yaml"]
    assert "metrics.jsonl" in run_outputs("train")
    (tmp_path / "metrics.jsonl").write_text("old\n")
    assert fresh_metrics_file(str(tmp_path)) == str(tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl.1").read_text() == "old\n" and not (tmp_path / "metrics.jsonl").exists()
