"""Entry points on user mistakes (issue 14, item 6): ``MFTUNE_DEBUG=1`` adds the traceback above the message of
every command (mftune.errors.report, the launcher's usage errors), never without it; a bare OSError about a
path reads as the path, the reason and the fix; inputs that gave quietly wrong results are refused. The
commands themselves, as a user runs them: tests/e2e/test_bad_inputs.py."""
from __future__ import annotations

import errno
import importlib.util
import os
import sys

import pytest

from mftune import launch
from mftune.checkpoint.merge import merge_lora_checkpoint
from mftune.errors import CheckpointError, UserError, message, report

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raised_from_none() -> UserError:
    try:
        try:
            int("x")
        except ValueError:
            raise UserError("--x=x is invalid: not a number. Pass a number.") from None
    except UserError as exc:
        return exc


def test_mftune_debug_shows_the_traceback_of_a_reported_error(monkeypatch, capsys):
    exc = _raised_from_none()
    monkeypatch.delenv("MFTUNE_DEBUG", raising=False)
    assert report("tool", exc) == 2
    assert capsys.readouterr().err == "tool: error: --x=x is invalid: not a number. Pass a number.\n"
    for off in ("0", "false", ""):
        monkeypatch.setenv("MFTUNE_DEBUG", off)
        report("tool", exc)
        assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MFTUNE_DEBUG", "1")
    report("tool", exc)
    err = capsys.readouterr().err
    assert err.startswith("mftune: MFTUNE_DEBUG is set: the traceback of the error reported below\nTraceback")
    assert "ValueError: invalid literal for int()" in err  # the cause `from None` hides from users
    assert "in _raised_from_none" in err
    assert err.endswith("tool: error: --x=x is invalid: not a number. Pass a number.\n")


def test_mftune_debug_in_the_launcher_and_a_script(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MFTUNE_DEBUG", "1")
    assert launch.main(["run_finetune.py", "two"]) == 1  # WORKER_NUM=two
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err and "error: WORKER_NUM=two is invalid" in err
    spec = importlib.util.spec_from_file_location("convert_weight", os.path.join(ROOT, "scripts", "convert_weight.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    missing = str(tmp_path / "missing")
    assert script.main(["--input_path", missing, "--output_path", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and missing in err.splitlines()[-1]
    monkeypatch.setenv("MFTUNE_DEBUG", "0")
    assert script.main(["--input_path", missing, "--output_path", str(tmp_path / "o.safetensors")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_bare_os_error_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    blocked = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "file" / "out"))
    assert message(blocked) == (f"{tmp_path / 'file'} is a file where a folder is needed (Not a directory: "
                                f"{tmp_path / 'file' / 'out'}). Pass a folder path, or move the file.")
    exists = OSError(errno.EEXIST, "File exists", str(tmp_path / "file"))  # os.makedirs of a file's path
    assert message(exists).startswith(f"{tmp_path / 'file'} is a file where a folder is needed (File exists: ")
    denied = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert message(denied) == "/root/x: Permission denied. Pass a path you may read (and write, for an output)."
    assert message(OSError("no file named")) == "no file named"  # nothing to add
    assert message(UserError("as worded")) == "as worded"


def test_merge_refuses_a_scaling_that_is_not_finite(tmp_path):
    """Before: --lora_scaling nan wrote a merged model of NaN weights, exit 0."""
    lc = lora_checkpoint.build(tmp_path)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match=f"lora_scaling={bad} is invalid: not a finite number"):
            merge_lora_checkpoint(lc.lora_path, str(tmp_path / "merged"), base_path=lc.base_path, lora_scaling=bad)
    assert not os.path.exists(tmp_path / "merged" / "merged_lora.safetensors")
