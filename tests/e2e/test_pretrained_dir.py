"""``--pretrained_model_dir`` as a Hugging Face user runs it (issue 13's "done when"): a downloaded-style
Llama 3 directory (byte-level BPE tokenizer.json with Llama 3 Instruct's chat template, rope_theta 500000,
llama3 RoPE scaling, GQA, tied embeddings, a list of eos ids), and configs/llama3/lora_pretrained_dir.yaml,
which names no architecture key.

Expected values come from transformers on the same directory: the first step's loss is the pretrained
model's mean loss on the first batch (LoRA B starts at 0), each record tokenized with
``apply_chat_template`` and trained on the assistant's tokens only; predict prints what ``generate``
gives greedily on ``apply_chat_template(..., add_generation_prompt=True)``; the merged LoRA directory
loads with AutoModelForCausalLM + AutoTokenizer and generates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from hf_llama3_dir import llama3_style_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "llama3", "lora_pretrained_dir.yaml")
SEQ, BATCH = 48, 2
QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue is one."),
      ("Say hello in French.", "Bonjour!"), ("Is the sky blue?", "Yes, on a clear day."),
      ("Count to three.", "One, two, three."), ("What do cats say?", "Meow."),
      ("Spell dog.", "D, O, G."), ("Opposite of hot?", "Cold.")]
QUESTION = "What is two plus two?"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def _messages(question: str, answer: str | None = None) -> list[dict]:
    return [{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answer else [])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny Llama 3-style directory, its transformers model and tokenizer, and alpaca data."""
    d = tmp_path_factory.mktemp("pretrained_dir")
    directory, model, tok = llama3_style_dir(str(d / "model"))
    data = str(d / "alpaca.json")
    with open(data, "w") as f:
        json.dump([{"instruction": q, "input": "", "output": a} for q, a in QA], f)
    return {"d": d, "dir": directory, "tok": tok, "model": model, "data": data}


def _reference_first_loss(model, tok) -> float:
    """Mean next-token loss over the assistant tokens of the first BATCH records, as transformers computes it:
    the ids of ``apply_chat_template``, labelled where a token overlaps the answer (the text after the rendered
    generation prompt; its first token may start inside the prompt's last whitespace)."""
    losses, count = 0.0, 0
    for question, answer in QA[:BATCH]:
        text = tok.apply_chat_template(_messages(question, answer), tokenize=False)
        start = len(tok.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = tok.apply_chat_template(_messages(question, answer), tokenize=True)
        assert enc["input_ids"] == (ids["input_ids"] if hasattr(ids, "keys") else ids) and len(ids) <= SEQ + 1
        labels = torch.tensor([i if e > start else -100 for i, (_, e) in zip(enc["input_ids"], enc["offset_mapping"])])
        with torch.no_grad():
            logits = model(torch.tensor([enc["input_ids"]])).logits[0, :-1]
        losses += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    return losses / count


def _first_loss(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


@pytest.fixture(scope="module")
def finetuned(hf_dir):
    """4 LoRA steps (a learning rate that moves the adapters), checkpoints at steps 2 and 4."""
    out = str(hf_dir["d"] / "finetune")
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "finetune", "--pretrained_model_dir", hf_dir["dir"],
            "--output_dir", out, *_train_args(hf_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


def _train_args(hf_dir) -> list[str]:
    return ["--train_dataset_dir", hf_dir["data"], "--epochs", "1", "--batch_size", str(BATCH),
            "--model.model_config.seq_length", str(SEQ), "--train_dataset.data_loader.shuffle", "False",
            "--optimizer.learning_rate", "0.01", "--lr_schedule.learning_rate", "0.01",
            "--callbacks.1.save_checkpoint_steps", "2"]


def test_finetune_takes_architecture_tokenizer_and_template_from_the_directory(hf_dir, finetuned):
    out, log = finetuned
    assert "the architecture from its config.json" in log and "conversation template hf" in log
    assert "compute_dtype float32, param_init_type float32 (CPU; config.json's torch_dtype is float32)" in log
    assert _first_loss(out) == pytest.approx(_reference_first_loss(hf_dir["model"], hf_dir["tok"]), rel=1e-5)
    with open(os.path.join(out, "resolved_config.yaml")) as f:
        resolved = f.read()
    assert "theta: 500000.0" in resolved and "extend_method: LLAMA3" in resolved and "tie_word_embeddings: true" in resolved


def _transformers_answer(hf_dir, max_decode_length: int) -> list[int]:
    tok, model = hf_dir["tok"], hf_dir["model"]
    ids = tok.apply_chat_template(_messages(QUESTION), add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_decode_length - ids.shape[1])
    return out[0, ids.shape[1]:].tolist()


def test_predict_answers_as_transformers_generate_on_the_chat_template(hf_dir):
    out = str(hf_dir["d"] / "predict")
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "predict", "--pretrained_model_dir", hf_dir["dir"],
            "--predict_data", QUESTION, "--output_dir", out, "--model.model_config.max_decode_length", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        result = json.loads(f.readline())
    expected = _transformers_answer(hf_dir, 40)
    assert len(result["output_ids"]) >= 5  # a real answer, not an immediate stop
    eos = set(hf_dir["model"].generation_config.eos_token_id)
    assert result["output_ids"] == [t for t in expected if t not in eos][:len(result["output_ids"])]
    assert len(result["output_ids"]) == len([t for t in expected if t not in eos])
    assert f"output: {hf_dir['tok'].decode(result['output_ids'])}" in r.stdout


def test_merged_lora_directory_loads_in_transformers(hf_dir, finetuned):
    out, _ = finetuned
    merged = str(hf_dir["d"] / "merged")
    ckpt = os.path.join(out, "checkpoint")
    r = run("scripts/transform_ckpt_lora.py", "--src_ckpt_path_or_dir", ckpt, "--dst_ckpt_dir", merged,
            "--output_format", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert tok.chat_template == hf_dir["tok"].chat_template
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.tie_word_embeddings
    ids = tok.apply_chat_template(_messages(QUESTION), add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, do_sample=False, max_new_tokens=4).shape[1] > ids.shape[1]


@pytest.mark.parametrize("key,value,named", [
    ("theta", "10000.0", "theta=500000.0"), ("n_kv_heads", "4", "n_kv_heads=2"),
    ("tie_word_embeddings", "False", "tie_word_embeddings=True"), ("extend_method", "None", "extend_method='LLAMA3'")])
def test_yaml_architecture_that_disagrees_is_an_error_naming_both_values(hf_dir, key, value, named):
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "predict", "--pretrained_model_dir", hf_dir["dir"],
            "--predict_data", QUESTION, "--output_dir", str(hf_dir["d"] / "bad"), f"--model.model_config.{key}", value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"model.model_config.{key}=" in r.stderr and named in r.stderr and "config.json has" in r.stderr


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def test_resume_finds_the_directory_in_the_checkpoint_and_continues_exactly(hf_dir, finetuned):
    """Resumed from step 2 with the documented resume flags and no --pretrained_model_dir: the directory the
    run started from is found in the checkpoint's record of its base; steps 3-4 equal the uninterrupted run."""
    out, _ = finetuned
    resumed = str(hf_dir["d"] / "resumed")
    r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "finetune", "--output_dir", resumed,
            "--load_checkpoint", os.path.join(out, "checkpoint"), "--resume_training", "llama_lora_rank_0-1_2",
            *_train_args(hf_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the run started from the Hugging Face directory" in r.stdout + r.stderr
    assert _losses(resumed) == _losses(out)[2:] and len(_losses(out)) == 4


def test_peft_adapter_over_the_directory_predicts_as_the_lora_checkpoint(hf_dir, finetuned):
    """export_adapter.py's PEFT directory (no base weights, no base record) over --pretrained_model_dir gives
    the answer of the LoRA checkpoint it was exported from, whose recorded base is that directory."""
    out, _ = finetuned
    adapter = str(hf_dir["d"] / "adapter")
    r = run("scripts/export_adapter.py", "--src_checkpoint", os.path.join(out, "checkpoint"), "--output_dir", adapter)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = []
    for name, weights in (("from_adapter", adapter), ("from_lora", os.path.join(out, "checkpoint"))):
        pred = str(hf_dir["d"] / name)
        r = run("run_finetune.py", "--config", CONFIG, "--run_mode", "predict", "--pretrained_model_dir",
                hf_dir["dir"], "--load_checkpoint", weights, "--predict_data", QUESTION, "--output_dir", pred,
                "--model.model_config.max_decode_length", "40")
        assert r.returncode == 0, r.stderr[-3000:]
        with open(os.path.join(pred, "predict_results.jsonl")) as f:
            answers.append(json.loads(f.readline())["output_ids"])
    assert answers[0] == answers[1]
    assert answers[0] != _transformers_answer(hf_dir, 40)[:len(answers[0])]  # the adapters change the answer
