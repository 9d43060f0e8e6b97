"""scripts/convert_weight.py as a user runs it (real subprocesses, MindFormers' argument names): a
.bin directory to mftune and back to a directory transformers reads bit for bit, and unknown tensor
names refused with exit status 2, each named."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_hf

from mftune.checkpoint.convert import convert_hf_to_mftune

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "convert_weight.py")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The two layouts the scripts read here: sharded .bin files and one safetensors file (GQA)."""
    return tiny_hf.hf_dirs(tmp_path_factory.mktemp, ["bin_sharded", "single_safetensors_gqa"])


def test_script_forward_and_reversed(hf_dirs, tmp_path, capsys):
    """The CLI (MindFormers' argument names): exit 0, a summary line, a file transformers reads back."""
    hf, directory = hf_dirs["bin_sharded"]
    ckpt, out = str(tmp_path / "llama.safetensors"), str(tmp_path / "hf")
    fwd = subprocess.run([sys.executable, SCRIPT, "--model", "llama", "--input_path",
                          os.path.join(directory, "pytorch_model.bin.index.json"), "--output_path", ckpt,
                          "--dtype", "fp32"], capture_output=True, text=True, timeout=120)
    assert fwd.returncode == 0, fwd.stderr
    assert "Converted 21 tensors" in fwd.stdout and ckpt in fwd.stdout
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import convert_weight  # the same main(), in-process: one interpreter start is enough
    finally:
        sys.path.pop(0)
    assert convert_weight.main(["--reversed", "--input_path", ckpt, "--output_path", out,
                                "--max_shard_size", "100KB"]) == 0
    assert "Converted 21 tensors" in capsys.readouterr().out
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_script_unknown_tensor_names_exit_2_naming_all(hf_dirs, tmp_path):
    _, directory = hf_dirs["single_safetensors_gqa"]
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    sd["vision_tower.proj.weight"] = torch.zeros(2, 2)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # a buffer: skipped, not an error
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, SCRIPT, "--input_path", str(bad), "--output_path", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.layers.0.self_attn.q_proj.bias" in proc.stderr and "vision_tower.proj.weight" in proc.stderr
    assert "inv_freq" not in proc.stderr and not out.exists()
    for name in ("model.layers.0.self_attn.q_proj.bias", "vision_tower.proj.weight"):
        del sd[name]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert convert_hf_to_mftune(str(bad), str(out))["skipped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
