"""scripts/alpaca_converter.py and scripts/llama_preprocess.py as a user runs them (real subprocesses,
MindFormers' argument names), and TrainData over what they write.

Expected values come from MindFormers r1.3.0 `mindformers/tools/dataset_preprocess/llama/`
(reference/mindformers.md §7.1): the label rule is checked by decoding the unmasked tokens, which must
be exactly the answer followed by </s>."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from data_fixtures import index_dataset

from mftune.data import IGNORE_TOKEN_ID, LlamaTokenizer, TrainData
from mftune.data.conversation import alpaca_prompt, vicuna_prompt
from mftune.data.sample import load_sample_records, train_sample_tokenizer

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / "scripts" / "alpaca_converter.py"
PREPROCESS = REPO / "scripts" / "llama_preprocess.py"
SEQ = 96


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def model_file(work) -> str:
    """The demo's tokenizer (mftune.data.sample; the same pieces as tests/unit/test_data.py's)."""
    return train_sample_tokenizer(str(work / "tok"), 1000)


@pytest.fixture(scope="module")
def tok(model_file) -> LlamaTokenizer:
    return LlamaTokenizer(model_file)


@pytest.fixture(scope="module")
def conv_json(work) -> str:
    """The bundled sample converted by the real script (a subprocess: the user's path)."""
    out = work / "conv.json"
    r = _run(CONVERTER, "--data_path", str(REPO / "mftune/data/sample_alpaca.json"), "--output_path", str(out))
    assert r.returncode == 0, r.stderr
    assert "Converted 2000 records" in r.stdout
    return str(out)


@pytest.fixture(scope="module")
def qa_dir(work, conv_json, model_file) -> str:
    out = work / "alpaca-fastchat96.mindrecord"
    r = _run(PREPROCESS, "--dataset_type", "qa", "--input_glob", conv_json, "--model_file", model_file,
             "--seq_length", str(SEQ), "--output_file", str(out))
    assert r.returncode == 0, r.stderr
    assert "Transformed 2000 records." in r.stdout
    return str(out)


def test_converter_format(conv_json):
    recs = json.loads(Path(conv_json).read_text(encoding="utf-8"))
    src = load_sample_records()
    assert len(recs) == len(src) == 2000
    for i in (0, 1, 2):
        r = recs[i]
        assert r["id"] == str(i + 1)
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        assert r["conversations"][0]["value"] == alpaca_prompt(src[i]["instruction"], src[i]["input"])
        assert r["conversations"][1]["value"] == src[i]["output"]


def test_qa_records_and_labels(qa_dir, conv_json, tok):
    ds = datasets.load_from_disk(qa_dir)
    assert ds.column_names == ["input_ids", "labels"]
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int32"
    convs = json.loads(Path(conv_json).read_text(encoding="utf-8"))
    for i in range(0, len(ds), 97):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert len(ids) == len(labels) == SEQ + 1
        human, answer = (t["value"] for t in convs[i]["conversations"])
        # Prompt part: <s> + "system USER: {human} ASSISTANT:" is masked (MindFormers' instruction_len).
        n_prompt = len(tok.encode(vicuna_prompt(human), add_bos=True))
        n_real = n_prompt + len(tok.encode(answer, add_bos=False)) + 1  # "▁answer" + </s>
        assert all(x == IGNORE_TOKEN_ID for x in labels[:n_prompt])
        assert labels[n_prompt:n_real] == ids[n_prompt:n_real]
        assert ids[n_real - 1] == tok.eos_token_id
        assert all(x == tok.pad_token_id for x in ids[n_real:]) and all(x == IGNORE_TOKEN_ID for x in labels[n_real:])
        trained = [x for x, y in zip(ids, labels) if y != IGNORE_TOKEN_ID]
        assert tok.decode(trained[:-1]) == answer and trained[-1] == tok.eos_token_id


def _conv(q: str, a: str) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def test_on_error_fail_exits_2_without_traceback(tmp_path, model_file):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([_conv("q", "a"), {"conversations": [{"from": "gpt"}]}]), encoding="utf-8")
    out = tmp_path / "out"
    r = _run(PREPROCESS, "--dataset_type", "qa", "--input_glob", src, "--model_file", model_file,
             "--output_file", str(out), "--on_error", "fail")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert lines == [f"llama_preprocess.py: error: {src}: record 1: field 'conversations[0].value' is missing"]
    assert not out.exists() and os.listdir(tmp_path) == ["bad.json"]


@pytest.fixture(scope="module")
def index_dir(work) -> str:
    return index_dataset(str(work / "index_ds"))


def test_loader_shapes_and_sizes(qa_dir, index_dir):
    d = TrainData(qa_dir, micro_batch_size=4, grad_accum=2, dp_size=2, dp_rank=1)
    assert (d.num_records, d.record_length, d.global_batch_size, d.steps_per_epoch) == (2000, SEQ + 1, 16, 125)
    step = next(d.epoch(0))
    assert len(step) == 2
    for mb in step:
        assert set(mb) == {"input_ids", "labels"}
        assert mb["input_ids"].shape == mb["labels"].shape == (4, SEQ + 1)
        assert mb["input_ids"].dtype == mb["labels"].dtype == torch.long
    mb = next(TrainData(index_dir, micro_batch_size=3, shuffle=False).epoch(0))[0]
    assert mb["labels"].tolist() == [[-100, i, i, i, i] for i in range(3)]
