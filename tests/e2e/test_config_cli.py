"""python -m mftune.cli (a real subprocess): a bad YAML exits 2 with every error listed and no traceback;
a good one prints the resolved config and the one ignored-keys line."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import yaml


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA_7B = os.path.join(REPO, "configs", "llama2", "lora_llama2_7b.yaml")


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_bad_yaml_exits_2_without_traceback(tmp_path):
    bad = write(tmp_path, "bad.yaml", "run_mode: predict\nrunner_config: {epochs: 0, epoch: 1}\nseed: x\n")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "mftune.cli", "--config", bad], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"mftune: 3 configuration error(s) in {bad}:")
    assert "runner_config.epoch=1 is invalid: 'runner_config' has no key 'epoch' (did you mean 'epochs'?). " \
           "Rename or remove it." in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "mftune.cli", "--config", LORA_7B, "--run_mode", "predict"],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["run_mode"] == "predict"
    assert "Ignored on this backend" in ok.stderr
