"""The launcher's restart budget and watchdog settings (--max_restarts, --heartbeat_timeout, the YAML keys),
and how a restarted training run picks its checkpoint (mftune.trainer.restart). Real restarts through torchrun:
tests/e2e/test_restart.py."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from mftune import launch
from mftune.checkpoint.formats.single_file import save_complete
from mftune.config.load import load_config
from mftune.errors import ConfigError
from mftune.launch import build_command, parse_args, settings_lines, split_options
from mftune.trainer import restart
from mftune.trainer.restart import own_checkpoint, restart_config

REPO = Path(__file__).resolve().parents[2]
LORA_7B = str(REPO / "configs" / "llama2" / "lora_llama2_7b.yaml")


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.mark.parametrize("argv, positional, given", [
    (["--max_restarts", "2", "S", "4"], ["S", "4"], {"max_restarts": "2"}),
    (["S", "4", "--max_restarts=3"], ["S", "4"], {"max_restarts": "3"}),
    (["S", "--max-restarts", "1", "4", "--heartbeat_timeout", "30"], ["S", "4"],
     {"max_restarts": "1", "heartbeat_timeout": "30"}),
    (["S --max_restarts 5", "4"], ["S --max_restarts 5", "4"], {}),  # inside EXECUTE_ORDER: the script's
])
def test_options_stand_anywhere(argv, positional, given):
    assert split_options(argv) == (positional, given, [])


def test_option_without_value_is_an_error():
    assert split_options(["S", "--max_restarts"])[2] == [
        "--max_restarts is invalid: it needs a value. Give e.g. --max_restarts 2 (0: the job ends at the first failure)."]


def test_flag_before_or_after_the_positional_form(script):
    before = parse_args(["--max_restarts", "2", script, "2", "9000", "logs", "True", "60"])
    after = parse_args([script, "2", "9000", "logs", "True", "60", "--max_restarts=2"])
    assert before == after and (before.max_restarts, before.worker_num, before.master_port) == (2, 2, 9000)
    assert before.settings_from == "max_restarts 2 from --max_restarts"
    assert build_command(before)[build_command(before).index("--max-restarts") + 1] == "2"


def test_defaults_keep_todays_behaviour(script):
    args = parse_args([script, "2"])
    assert (args.max_restarts, args.heartbeat_timeout, args.settings_from) == (0, 600, "")
    assert "--max-restarts" in build_command(args) and settings_lines(args) == []
    # a short CLUSTER_TIME_OUT lowers the default watchdog timeout below it (a given one is kept, with a notice)
    assert parse_args([script, "2", "9000", "logs", "True", "60"]).heartbeat_timeout == 30
    given = parse_args([script, "2", "9000", "logs", "True", "60", "--heartbeat_timeout", "90"])
    assert given.heartbeat_timeout == 90 and "is not below CLUSTER_TIME_OUT=60" in settings_lines(given)[-1]


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_keys_read_from_the_config_in_execute_order(tmp_path, script):
    base = _yaml(tmp_path, "seed: 1\nmax_restarts: 3\nheartbeat_timeout: 120\n", "base.yaml")
    config = _yaml(tmp_path, "base_config: base.yaml\nheartbeat_timeout: 45\n")
    args = parse_args([f"{script} --config {config} --run_mode finetune", "2"])
    assert (args.max_restarts, args.heartbeat_timeout) == (3, 45)
    assert args.settings_from == f"max_restarts 3 from {config}; heartbeat_timeout 45 from {config}"
    assert settings_lines(args) == [f"Restarts: up to 3; a rank without progress for 45 s counts as hung "
                                    f"({args.settings_from})"]
    assert os.path.basename(base) == "base.yaml"


def test_flag_wins_over_execute_order_override_over_yaml(tmp_path, script):
    config = _yaml(tmp_path, "max_restarts: 3\n")
    assert parse_args([f"{script} --config={config}", "2"]).max_restarts == 3
    assert parse_args([f"{script} --config {config} --max_restarts 1", "2"]).max_restarts == 1
    assert parse_args([f"{script} --config {config} --max_restarts 1", "2", "--max_restarts", "0"]).max_restarts == 0


def test_unreadable_yaml_is_left_to_the_run(tmp_path, script):
    """A missing or broken YAML is the trainer's to report, with its full checks."""
    broken = _yaml(tmp_path, "a: [1\n")
    assert parse_args([f"{script} --config {broken}", "2"]).max_restarts == 0
    assert parse_args([f"{script} --config {tmp_path}/missing.yaml", "2"]).max_restarts == 0


@pytest.mark.parametrize("where, expected", [
    ("flag", "max_restarts=two is invalid (from --max_restarts): not a whole number >= 0."),
    ("yaml", "max_restarts=-1 is invalid (from {config}): not a whole number >= 0."),
    ("yaml_bool", "max_restarts=True is invalid (from {config}): not a whole number >= 0."),
])
def test_bad_values_are_usage_errors_naming_the_source(tmp_path, script, capsys, where, expected):
    value = {"flag": "2", "yaml": "-1", "yaml_bool": "true"}[where]
    config = _yaml(tmp_path, f"max_restarts: {value}\n")
    argv = [f"{script} --config {config}", "2"] + (["--max_restarts", "two"] if where == "flag" else [])
    assert launch.main(argv) == 1
    err = capsys.readouterr().err
    assert expected.format(config=config) in err and "Usage" in err and "Traceback" not in err


# --- the trainer side: which checkpoint a restarted run continues from ---------------------------------------

def _save(root: Path, rank: int, epoch: int, step: int, mtime: float | None = None, prefix: str = "p") -> str:
    path = root / f"rank_{rank}" / f"{prefix}_rank_{rank}-{epoch}_{step}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_complete(str(path), {"global_step": torch.tensor(step, dtype=torch.int64), "w": torch.ones(4)},
                  model_config={})
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


def test_own_checkpoint_is_the_newest_step_of_this_job_every_rank_holds_intact(tmp_path):
    root, start = tmp_path / "checkpoint", time.time() - 100
    for rank in (0, 1):
        _save(root, rank, 1, 9, mtime=start - 50, prefix="old")  # an earlier job's: never taken
        _save(root, rank, 1, 2)
    _save(root, 0, 1, 4)  # rank 1 never saved step 4
    assert own_checkpoint(str(root), start, 2) == [str(root / f"rank_{r}" / f"p_rank_{r}-1_2.safetensors") for r in (0, 1)]
    newest = _save(root, 1, 1, 4)
    with open(newest, "r+b") as f:  # truncated: skipped for the intact step 2
        f.truncate(os.path.getsize(newest) - 3)
    assert own_checkpoint(str(root), start, 2)[0].endswith("p_rank_0-1_2.safetensors")
    assert own_checkpoint(str(root), time.time() + 10, 2) is None  # nothing saved since the job started


@pytest.fixture
def cfg(tmp_path):
    return dataclasses.replace(load_config(LORA_7B, check_files=False), output_dir=str(tmp_path / "out"))


def test_first_attempt_and_other_modes_are_unchanged(cfg, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_config(cfg) is cfg
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_config(dataclasses.replace(cfg, run_mode="predict")).load_checkpoint == cfg.load_checkpoint


def test_restarted_run_resumes_from_its_last_checkpoint(cfg, tmp_path, monkeypatch, caplog):
    root = tmp_path / "out" / "checkpoint"
    monkeypatch.setenv("MFTUNE_JOB_START", str(time.time() - 10))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert restart_config(cfg) is cfg  # nothing saved yet: starts again as configured
    assert "restart 1 of 2: no checkpoint of this job" in caplog.text
    first = [_save(root, r, 1, 2) for r in (0, 1)][0]
    again = restart_config(dataclasses.replace(cfg, auto_trans_ckpt=True))
    assert (again.load_checkpoint, again.resume_training, again.auto_trans_ckpt) == \
           (str(root), os.path.basename(first), False)
    assert f"restart 1 of 2: resuming from {first} (step 2)" in caplog.text


def test_settings_checked_and_warned_without_the_launcher(cfg, monkeypatch, caplog):
    monkeypatch.delenv("MFTUNE_JOB_START", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    restart_config(dataclasses.replace(cfg, max_restarts=2))
    assert "max_restarts=2 has no effect here: restarts need the launcher" in caplog.text
    with pytest.raises(ConfigError, match="max_restarts=-1 is invalid"):
        restart_config(dataclasses.replace(cfg, max_restarts=-1))


def test_job_start_falls_back_to_the_parent_process(monkeypatch):
    monkeypatch.delenv("MFTUNE_JOB_START", raising=False)
    started = restart.job_start()  # pytest's parent: started before this test
    assert 0 < started <= time.time()
    monkeypatch.setenv("MFTUNE_JOB_START", "12.5")
    assert restart.job_start() == 12.5
