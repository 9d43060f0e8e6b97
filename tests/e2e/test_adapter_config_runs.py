"""A PEFT adapter given to run_finetune.py as ``--load_checkpoint`` is applied with its own adapter_config.json
(issue 14, item 1), as a user runs it: a tiny Llama 3-style Hugging Face directory (tests/hf_llama3_dir.py) as
``--pretrained_model_dir``, configs/llama3/lora_pretrained_dir.yaml with ``lora_alpha`` 16 (rank 16, wq|wk|wv|wo),
and an adapter peft saved with r 4, lora_alpha 64 on q_proj and v_proj.

Expected values come from peft on the same directory: predict prints what the PeftModel's greedy ``generate``
gives on the chat template; with alpha 16 (the YAML's) peft answers differently, so the test tells the two apart.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_llama3_dir import llama3_style_dir

from mftune.checkpoint.safetensors_io import read_metadata

peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "llama3", "lora_pretrained_dir.yaml")
QUESTION = "What is two plus two?"
MAX_DECODE = 40
YAML_ALPHA = ["--model.model_config.pet_config.lora_alpha", "16"]  # the file says 32; the adapter 64


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """The directory, the PeftModel over its weights (r 4, alpha 64, q_proj/v_proj, random A and small random B),
    the adapter saved by peft, and the tokenizer."""
    d = tmp_path_factory.mktemp("adapter_runs")
    directory, model, tok = llama3_style_dir(str(d / "model"))
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a fine-tuned-sized change: the answer moves, it does not turn to noise
    peft_model.save_pretrained(str(d / "adapter"))
    return {"d": d, "dir": directory, "peft": peft_model, "tok": tok, "adapter": str(d / "adapter")}


def _peft_answer(adapter, scaling: float | None = None) -> list[int]:
    """The PeftModel's greedy answer on the chat template (``scaling``: another alpha/r, restored after), eos cut."""
    tok, model = adapter["tok"], adapter["peft"]
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    if scaling is not None:
        for m in layers:
            m.scaling["default"] = scaling
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=MAX_DECODE - ids.shape[1])
    for m, s in zip(layers, saved):
        m.scaling.update(s)
    eos = set(model.generation_config.eos_token_id)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in eos]


def test_predict_applies_the_adapter_config_over_a_differing_yaml(adapter):
    out = str(adapter["d"] / "predict")
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "predict", "--pretrained_model_dir", adapter["dir"],
            "--load_checkpoint", adapter["adapter"], "--predict_data", QUESTION, "--output_dir", out,
            "--model.model_config.max_decode_length", str(MAX_DECODE), *YAML_ALPHA)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    where = os.path.join(adapter["adapter"], "adapter_config.json")
    assert ("WARNING" in log and f"model.model_config.pet_config.lora_alpha=16 (YAML) is replaced by the adapter's "
            f"lora_alpha=64 ({where})" in log), log[-3000:]
    assert f"model.model_config.pet_config.lora_rank=16 (YAML) is replaced by the adapter's r=4 ({where})" in log
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        answer = json.loads(f.readline())["output_ids"]
    expected = _peft_answer(adapter)
    assert len(answer) >= 5 and answer == expected
    assert expected != _peft_answer(adapter, scaling=16 / 4)  # what the YAML's alpha would have given


@pytest.fixture(scope="module")
def finetuned(adapter):
    """A finetune from the adapter with the YAML's differing pet_config: (its output_dir, the run)."""
    data = str(adapter["d"] / "alpaca.json")
    with open(data, "w") as f:
        json.dump([{"instruction": QUESTION, "input": "", "output": "Four."},
                   {"instruction": "Name a colour.", "input": "", "output": "Blue."}], f)
    out = str(adapter["d"] / "finetune")
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "finetune", "--pretrained_model_dir", adapter["dir"],
            "--load_checkpoint", adapter["adapter"], "--train_dataset_dir", data, "--output_dir", out,
            "--epochs", "1", "--batch_size", "2", "--model.model_config.seq_length", "48",
            "--callbacks.1.save_checkpoint_steps", "1", *YAML_ALPHA)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_finetune_from_the_adapter_records_its_pet_config(finetuned):
    """The checkpoints a run saves record the pet_config it applied: the adapter's."""
    out, r = finetuned
    assert "is replaced by the adapter's lora_alpha=64" in r.stdout + r.stderr
    rank_dir = os.path.join(out, "checkpoint", "rank_0")
    with open(os.path.join(rank_dir, "meta.json")) as f:
        ckpt = os.path.join(rank_dir, json.load(f)["last_ckpt_file"])
    meta = read_metadata(ckpt)
    for pet_config in (meta["pet_config"], meta["model_config"]["pet_config"]):
        assert (pet_config["lora_rank"], pet_config["lora_alpha"], pet_config["target_modules"]) == (4, 64, ".*wq|.*wv")


def test_an_mftune_lora_checkpoint_applies_the_pet_config_it_records(adapter, finetuned):
    """Its LoRA factors were trained with r 4, alpha 64 on wq/wv: a YAML saying r 16, alpha 16 on wq|wk|wv|wo is
    overruled with a warning per value, and predict answers as with the checkpoint's own values in the YAML."""
    checkpoint = os.path.join(finetuned[0], "checkpoint")
    answers, logs = [], []
    for name, pet in (("differing", YAML_ALPHA), ("matching", [
            "--model.model_config.pet_config.lora_alpha", "64", "--model.model_config.pet_config.lora_rank", "4",
            "--model.model_config.pet_config.target_modules", ".*wq|.*wv"])):
        out = str(adapter["d"] / f"predict_{name}")
        r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "predict", "--pretrained_model_dir",
                adapter["dir"], "--load_checkpoint", checkpoint, "--predict_data", QUESTION, "--output_dir", out,
                "--model.model_config.max_decode_length", str(MAX_DECODE), *pet)
        assert r.returncode == 0, r.stderr[-3000:]
        logs.append(r.stdout + r.stderr)
        with open(os.path.join(out, "predict_results.jsonl")) as f:
            answers.append(json.loads(f.readline())["output_ids"])
    assert f"model.model_config.pet_config.lora_alpha=16 (YAML) is replaced by lora_alpha=64, which " \
           f"load_checkpoint={checkpoint} was trained with" in logs[0], logs[0][-3000:]
    assert "model.model_config.pet_config.lora_rank=16 (YAML) is replaced by lora_rank=4" in logs[0]
    assert "is replaced by the checkpoint's target_modules='.*wq|.*wv'" in logs[0]
    assert "is replaced" not in logs[1]
    assert len(answers[0]) >= 5 and answers[0] == answers[1]
