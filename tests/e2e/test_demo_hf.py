"""The README's second embedded example: ``scripts/demo_hf.py`` builds a tiny random Llama 3-style Hugging Face
directory without transformers, LoRA-fine-tunes it with ``--pretrained_model_dir``, predicts and merges.

References: transformers reads the built directory as a Llama 3 download (AutoTokenizer ids and
``apply_chat_template`` = mftune's; AutoModelForCausalLM logits = ``mftune.LlamaForCausalLM.from_pretrained``
in float32), and loads the merged directory and generates from it.
"""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import mftune
from mftune.data.records import plain_prompt
from mftune.data.sample import load_sample_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "Llama-3-tiny-random"
QUESTION = "What is the opposite of hot?"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_hf")
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    r = subprocess.run([sys.executable, "scripts/demo_hf.py", "--output_dir", str(out), "--epochs", "1",
                        "--question", QUESTION], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def _quarter_means(path):
    with open(path) as f:
        losses = [json.loads(line)["loss"] for line in f]
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def test_demo_runs_the_loss_falls_and_predict_answers(demo):
    out, stdout = demo
    assert "Demo finished" in stdout and "--pretrained_model_dir" in stdout
    first, last = _quarter_means(out / "finetune" / "metrics.jsonl")
    assert last < first - 1.0, (first, last)  # measured: 4.69 -> 3.04 in one epoch (ln 1024 = 6.9 at random)
    with open(out / "predict" / "predict_results.jsonl") as f:
        result = json.loads(f.readline())
    assert result["prompt"] == QUESTION and len(result["output_ids"]) >= 2 and result["text"].strip()
    assert f"output: {result['text']}" in stdout  # the answer alone, not the rendered chat template
    assert (out / "loss_curve.png").stat().st_size > 10_000


def test_the_built_directory_is_a_llama3_style_download(demo):
    directory = demo[0] / MODEL
    config = json.loads((directory / "config.json").read_text())
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    eot, end = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["tie_word_embeddings"]
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["eos_token_id"] == [end, eot] and config["torch_dtype"] == "bfloat16"
    assert config["vocab_size"] == len(tok) and tok.bos_token_id == config["bos_token_id"] == eot - 9  # Meta's order
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok.eos_token == "<|eot_id|>"
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [end, eot]


def _conversations() -> list[list[dict]]:
    """Records of every task of the sample (with and without input) as chat messages, and a multilingual turn."""
    records = load_sample_records()[:12]
    chats = [[{"role": "user", "content": plain_prompt(r["instruction"], r["input"])},
              {"role": "assistant", "content": r["output"]}] for r in records]
    return chats + [[{"role": "user", "content": "Grüße, 世界! 😀  tabs\tand\n\nnewlines <|eot_id|>"}]]


def test_transformers_and_mftune_read_the_built_directory_alike(demo):
    directory = str(demo[0] / MODEL)
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(directory), mftune.load_tokenizer(directory)
    for messages in _conversations():
        for prompt in (False, True):
            expected = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            assert mftune.apply_chat_template(tok, messages, add_generation_prompt=prompt) == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = mftune.LlamaForCausalLM.from_pretrained(directory, dtype="float32", device="cpu")
    ids = torch.tensor([mftune.apply_chat_template(tok, _conversations()[0])])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_merged_directory_loads_in_transformers_and_generates(demo):
    merged = str(demo[0] / "merged")
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.config.rope_scaling["rope_type"] == "llama3" and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=8)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_the_builder_needs_no_transformers_and_is_deterministic(demo, tmp_path):
    again = tmp_path / MODEL
    code = ("import sys; from mftune.checkpoint.sample_hf import build_sample_hf_dir; "
            f"build_sample_hf_dir({str(again)!r}); assert 'transformers' not in sys.modules, 'transformers imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(os.listdir(demo[0] / MODEL))
    assert names == sorted(os.listdir(again))
    assert filecmp.cmpfiles(demo[0] / MODEL, again, names, shallow=False)[0] == names  # byte for byte
