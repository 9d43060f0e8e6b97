"""scripts/transform_ckpt_lora.py as a user runs it: a real subprocess, Hugging Face output loaded in
transformers with the LoRA model's logits (tests/lora_checkpoint.py builds the checkpoints)."""
from __future__ import annotations

import os
import subprocess
import sys

import lora_checkpoint
import pytest
from parity import ROOT
import torch

SCRIPT = os.path.join(ROOT, "scripts", "transform_ckpt_lora.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return lora_checkpoint.build(tmp_path_factory.mktemp("merge"))


def test_script_hf_output_loads_in_transformers(ckpt, tmp_path):
    """One real subprocess: MindFormers' argument names, --output_format hf, summary on stdout."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, SCRIPT, "--src_ckpt_strategy", "strategy/ckpt_strategy_rank_0.ckpt",
                           "--src_ckpt_path_or_dir", ckpt.lora_path, "--dst_ckpt_dir", str(out),
                           "--prefix", "checkpoint_", "--output_format", "hf"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Merged 4 LoRA weights" in proc.stdout and str(out) in proc.stdout
    assert "--src_ckpt_strategy is ignored" in proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=ckpt.x).logits
    torch.testing.assert_close(logits, ckpt.lora_logits, atol=1e-5, rtol=0)
