"""scripts/export_adapter.py as a user runs it (a real subprocess): the summary line, and a second
run refusing to overwrite its output with one line and exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import peft_base
import pytest
from parity import ROOT
from peft_base import SUBSET, lora_checkpoint

SCRIPT = os.path.join(ROOT, "scripts", "export_adapter.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return peft_base.build_base(tmp_path_factory.mktemp("peft_base"))


def test_script_subprocess(base, tmp_path):
    _, ckpt = lora_checkpoint(base, SUBSET, "run_cli")
    out = tmp_path / "adapter"
    cmd = [sys.executable, SCRIPT, "--src_checkpoint", ckpt, "--output_dir", str(out)]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj'], layers=[0, 2]" in r.stdout
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "export_adapter.py: error: output_dir=" in r.stderr
