"""The three Hugging Face exports as a user runs them (real subprocesses), then loaded the way users load
them: ``convert_weight.py`` there and ``--reversed`` back, ``transform_ckpt_lora.py --output_format hf`` and
``export_adapter.py`` on a LoRA checkpoint over the converted base; in each output directory AutoTokenizer
gives the source tokenizer's ids, the generation_config is the base's, and greedy ``generate`` equals the
reference: the source transformers model (reversed), a greedy loop over mftune's LoRA model (merged),
peft's AutoPeftModelForCausalLM over the base named in adapter_config.json (adapter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers
from hf_export_dirs import SAMPLE, greedy, lora_over, prompt_ids, save_hf_dir
from parity import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")


def _run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], check=False, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The source directory, a round trip through mftune, and a LoRA checkpoint over the converted base."""
    d = tmp_path_factory.mktemp("hf_exports")
    hf_dir, base, lora = str(d / "hf"), str(d / "base.safetensors"), str(d / "lora.safetensors")
    model = save_hf_dir(hf_dir)
    _run("convert_weight.py", "--input_path", hf_dir, "--output_path", base)
    lora_model = lora_over(base, lora)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return {"d": d, "hf": hf_dir, "base": base, "lora": lora, "model": model, "lora_model": lora_model, "tok": tok}


def _check_tokenizer(out: str, ref) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(SAMPLE).input_ids == ref(SAMPLE).input_ids
    assert tok.chat_template == ref.chat_template
    ids = prompt_ids(tok)
    assert ids.tolist() == prompt_ids(ref).tolist()
    return ids


def _generate(model, ids: torch.Tensor) -> list[int]:
    assert model.generation_config.max_new_tokens == 7  # the base's, not transformers' default 20
    with torch.no_grad():
        return model.generate(ids, do_sample=False)[0].tolist()


def test_reversed_directory_loads_and_generates(run):
    out = str(run["d"] / "back")
    stdout = _run("convert_weight.py", "--reversed", "--input_path", run["base"], "--output_path", out)
    assert f"Copied from {run['hf']}" in stdout and "Missing" not in stdout
    ids = _check_tokenizer(out, run["tok"])
    expected = _generate(run["model"], ids)
    assert _generate(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), ids) == expected


def test_merged_directory_loads_and_generates(run):
    out = str(run["d"] / "merged")
    stdout = _run("transform_ckpt_lora.py", "--src_ckpt_path_or_dir", run["lora"], "--dst_ckpt_dir", out,
                  "--output_format", "hf")
    assert f"Copied from {run['hf']}" in stdout and "Missing" not in stdout
    ids = _check_tokenizer(out, run["tok"])
    expected = greedy(run["lora_model"], ids)
    assert expected != _generate(run["model"], ids)  # the adapters change the answer: the test can fail
    assert _generate(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), ids) == expected


def test_adapter_directory_loads_in_peft(run):
    peft = pytest.importorskip("peft")
    out = str(run["d"] / "adapter")
    stdout = _run("export_adapter.py", "--src_checkpoint", run["lora"], "--output_dir", out, "--lora_dropout", "0")
    assert f"base_model_name_or_path={run['hf']}" in stdout and "Missing" not in stdout
    ids = _check_tokenizer(out, run["tok"])
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()  # loads the base it names
    with torch.no_grad():
        got = model.generate(input_ids=ids, do_sample=False)[0].tolist()
    assert got == greedy(run["lora_model"], ids)


def test_unknown_base_is_said_and_tokenizer_dir_fills_in(run):
    bare, moved = run["base"], str(run["d"] / "moved")
    os.rename(run["hf"], moved)  # the recorded origin is gone
    try:
        stdout = _run("convert_weight.py", "--reversed", "--input_path", bare, "--output_path", str(run["d"] / "x"))
        assert "no tokenizer files" in stdout and "pass --tokenizer_dir" in stdout
        stdout = _run("convert_weight.py", "--reversed", "--input_path", bare, "--output_path", str(run["d"] / "y"),
                      "--tokenizer_dir", moved)
        assert f"Copied from {moved} (given as --base_model_dir)" in stdout and "Missing" not in stdout
        _check_tokenizer(str(run["d"] / "y"), run["tok"])
    finally:
        os.rename(moved, run["hf"])
