"""Temporary files a killed save leaves behind (issue 14, item 4): found by mftune's own patterns, only when no
live process on this host is writing them and they are older than the age limit."""
from __future__ import annotations

import os
import time

from mftune.fileio import HOST, atomic_directory, atomic_path, remove_stale_temporaries, stale_temporaries

DEAD_PID = 2 ** 22 + 12345  # above the default pid_max: no process has it


def _old(path: str) -> str:
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def test_only_old_temporaries_of_dead_processes_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoint" / "rank_0"
    ckpt.mkdir(parents=True)
    dead = str(ckpt / f"llama_rank_0-1_4.safetensors.tmp.{DEAD_PID}")
    open(dead, "w").close()
    _old(dead)
    live = str(ckpt / f"meta.json.tmp.{os.getpid()}")  # this process: a save in progress
    open(live, "w").close()
    _old(live)
    young = str(ckpt / f"x.safetensors.tmp.{DEAD_PID + 1}")
    open(young, "w").close()
    folder = tmp_path / ".dataset.tmp-abc123"
    (folder / "new").mkdir(parents=True)
    _old(str(folder))
    kept = [str(ckpt / "llama_rank_0-1_2.safetensors"), str(tmp_path / "notes.tmp.txt")]
    for path in kept:
        open(path, "w").close()
        _old(path)
    assert sorted(stale_temporaries(str(tmp_path))) == sorted([dead, str(folder)])
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted([dead, str(folder)])
    assert all(os.path.exists(p) for p in [live, young, *kept]) and not os.path.exists(dead)
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []


def test_the_atomic_writers_names_are_the_patterns(tmp_path):
    with atomic_path(str(tmp_path / "a.json")) as tmp:
        open(tmp, "w").close()
        assert stale_temporaries(str(tmp_path), min_age_s=0) == []  # its writer (this process) is alive
        assert os.path.basename(tmp) == f"a.json.tmp.{HOST}-{os.getpid()}"
    with atomic_directory(str(tmp_path / "d")) as stage:
        os.makedirs(stage.path)
        assert os.path.basename(os.path.dirname(stage.path)).startswith(f".d.tmp-{HOST}-{os.getpid()}-")
        assert stale_temporaries(str(tmp_path), min_age_s=0) == []  # its writer (this process) is alive


def test_this_hosts_temporaries_of_a_dead_process_go_at_once(tmp_path):
    """A restart a second after a kill (the launcher's --max_restarts) leaves nothing behind; another host's
    (a shared filesystem) and an earlier version's names keep the age rule."""
    dead = tmp_path / f"llama_rank_0-1_4.safetensors.tmp.{HOST}-{DEAD_PID}"
    live = tmp_path / f"meta.json.tmp.{HOST}-{os.getpid()}"
    other_host = tmp_path / f"meta.json.tmp.{'0' * 8 if HOST != '0' * 8 else '1' * 8}-{DEAD_PID}"
    old_name = tmp_path / f"x.safetensors.tmp.{DEAD_PID}"
    folder = tmp_path / f".dataset.tmp-{HOST}-{DEAD_PID}-abc_123"
    for path in (dead, live, other_host, old_name):
        path.write_text("partial")
    folder.mkdir()
    assert sorted(stale_temporaries(str(tmp_path))) == sorted([str(dead), str(folder)])
    for path in (other_host, old_name):
        _old(str(path))
    assert sorted(stale_temporaries(str(tmp_path))) == sorted(map(str, [dead, folder, other_host, old_name]))


def test_a_run_removes_them_from_its_output_dir_and_says_so(tmp_path, caplog):
    import dataclasses
    import logging

    from mftune.config.schema import MFConfig
    from mftune.trainer import main

    rank = tmp_path / "checkpoint" / "rank_0"
    rank.mkdir(parents=True)
    stale = str(rank / f"llama_rank_0-1_4.safetensors.tmp.{DEAD_PID}")
    open(stale, "w").close()
    _old(stale)
    with caplog.at_level(logging.WARNING, logger="mftune"):
        main._remove_stale_temporaries(dataclasses.replace(MFConfig(), output_dir=str(tmp_path)), str(tmp_path))
    assert not os.path.exists(stale)
    assert "Removed 1 temporary file(s)" in caplog.text and "llama_rank_0-1_4.safetensors.tmp." in caplog.text
