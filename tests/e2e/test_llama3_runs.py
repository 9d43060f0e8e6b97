"""Llama 3 end to end: llama_preprocess.py with a tiktoken tokenizer.model (MindFormers' Llama 3
invocation), a tiny Llama 3.1-shaped LoRA run and predict on it; and MindFormers' own code as the
reference where it is installed (tests/mindformers_ref.py) together with its sources (research/llama3
is not in the mindformers wheel: it is read from a git mirror, ``$MFTUNE_MINDFORMERS_REPO``).

Expected values: the first step's loss is the base model's mean loss on the first batch (LoRA B starts
at 0); predict's prompt ids are Llama 3's chat format; MindFormers' ``research/llama3`` preprocess(),
its Llama3Tokenizer, its ``FreqsMgr`` (LLAMA3) and its ``TrainingDataset`` (wikipedia) give what mftune gives.
"""
import json
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mindformers_ref import run_mindformers
from tiktoken_files import SAMPLE_TEXTS, write_tiktoken_file

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import unique_state_dict
from mftune.data.loader import TrainData
from mftune.data.preprocess import write_json_atomic
from mftune.data.records import convert_alpaca
from mftune.data.sample import SAMPLE_ALPACA_PATH, train_sample_tokenizer
from mftune.data.templates import TEMPLATES
from mftune.data.tiktoken_tokenizer import Llama3Tokenizer
from mftune.models.config import model_args
from mftune.models.llama import LlamaConfig, LlamaForCausalLM
from mftune.models.rope import rope_cos_sin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINDFORMERS_REPO = os.environ.get("MFTUNE_MINDFORMERS_REPO", "/work/.mirror/mindspore-lab+mindformers/repo")
SEQ, RECORDS = 256, 24
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def run(args):
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Alpaca sample records as conversation JSON, a tiktoken tokenizer.model, the records preprocessed
    with MindFormers' Llama 3 command line (plus --tokenizer llama3), and a random tiny base model."""
    d = tmp_path_factory.mktemp("llama3")
    with open(SAMPLE_ALPACA_PATH) as f:
        records = json.load(f)[:RECORDS]
    write_json_atomic(convert_alpaca(records)[0], str(d / "conv.json"))
    tok = write_tiktoken_file(d / "tokenizer.model")
    r = run(["scripts/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", str(d / "conv.json"),
             "--model_file", tok, "--seq_length", str(SEQ), "--output_file", str(d / "alpaca.mindrecord"),
             "--tokenizer", "llama3"])
    assert r.returncode == 0, r.stderr
    torch.manual_seed(1)
    base = LlamaForCausalLM(_model_config(Llama3Tokenizer(tok)))
    save_complete(str(d / "base.safetensors"), unique_state_dict(base), model_config=base.config.to_dict())
    return d, tok, r.stdout, base


def _model_config(tok: Llama3Tokenizer) -> dict:
    return {"seq_length": SEQ, "max_position_embedding": SEQ, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
            "n_kv_heads": 2, "vocab_size": tok.vocab_size, "intermediate_size": 64, "theta": 500000.0,
            "extend_method": "LLAMA3", "scaling_factor": dict(SCALING), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "compute_dtype": "float32",
            "param_init_type": "float32", "rotary_dtype": "float32", "layernorm_compute_type": "float32",
            "softmax_compute_type": "float32"}


def _yaml(d, tok_file: str, base: LlamaForCausalLM, **tokenizer) -> str:
    with open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")) as f:
        cfg = yaml.safe_load(f)
    pet = cfg["model"]["model_config"]["pet_config"]
    cfg["model"]["model_config"].update(base.config.to_dict() | {"pet_config": pet})
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["model"]["model_config"].update({"max_decode_length": 48, "do_sample": False})
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = str(d / "alpaca.mindrecord")
    cfg["runner_config"].update({"epochs": 1, "batch_size": 4})
    cfg["processor"]["tokenizer"] = {"type": "Llama3Tokenizer", "vocab_file": tok_file, "model_max_length": SEQ,
                                     "pad_token": "<|reserved_special_token_0|>", **tokenizer}
    cfg["load_checkpoint"] = str(d / "base.safetensors")
    path = d / f"llama3_{len(tokenizer)}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_preprocess_writes_llama3_ids_and_a_lora_run_trains_on_them(workdir):
    d, tok_file, stdout, base = workdir
    tok = Llama3Tokenizer(tok_file)
    assert f"Transformed {RECORDS} records." in stdout
    ds = datasets.load_from_disk(str(d / "alpaca.mindrecord"))
    assert {len(r) for r in ds["input_ids"]} == {SEQ + 1}
    assert all(r[0] == tok.bos_token_id for r in ds["input_ids"])
    assert all(tok.eos_token_id in r or tok.pad_token_id not in r for r in ds["input_ids"])  # else truncated
    assert any(r[-1] == tok.pad_token_id for r in ds["input_ids"])  # MindFormers' pad <|reserved_special_token_0|>
    out = d / "out"
    r = run(["run_finetune.py", "--config", _yaml(d, tok_file, base), "--run_mode", "finetune",
             "--use_parallel", "False", "--output_dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert len(metrics) == RECORDS // 4 and all(math.isfinite(m["loss"]) for m in metrics)
    batch = next(TrainData(str(d / "alpaca.mindrecord"), micro_batch_size=4, seed=0).epoch(0))[0]
    with torch.no_grad():
        loss, count = base(batch["input_ids"], batch["labels"], reduction="sum")
    assert metrics[0]["loss"] == pytest.approx(float(loss) / int(count), rel=1e-5)


def test_predict_applies_the_llama3_chat_format_when_asked(workdir):
    """processor.tokenizer.chat_template: llama3 -> each prompt is a user message in Llama 3's format (the
    MindFormers default, the prompt as given without bos, is pinned in tests/unit/test_llama3.py)."""
    d, tok_file, _, base = workdir
    tok = Llama3Tokenizer(tok_file)
    out = d / "predict"
    r = run(["run_finetune.py", "--config", _yaml(d, tok_file, base, chat_template="llama3"), "--run_mode",
             "predict", "--use_parallel", "False", "--output_dir", str(out), "--predict_data", "Give three tips."])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "predict_results.jsonl") as f:
        (result,) = [json.loads(line) for line in f]
    assert result["input_ids"] == TEMPLATES["llama3"].prompt_ids(tok, "Give three tips.")
    assert result["input_ids"][0] == tok.bos_token_id and 0 < len(result["output_ids"]) <= 48 - len(result["input_ids"])


# ------------------------------------------------------------------------------ MindFormers as the reference

def _mindformers_sources(tmp_path, files: dict[str, str], tag: str = "v1.3.0") -> str:
    """``files`` (mirror path -> path under the returned directory) from MindFormers' git mirror."""
    if not os.path.isdir(MINDFORMERS_REPO):
        pytest.skip(f"MindFormers sources unavailable: no git mirror at {MINDFORMERS_REPO} (MFTUNE_MINDFORMERS_REPO)")
    root = tmp_path / "mf_src"
    for src, dst in files.items():
        r = subprocess.run(["git", "-C", MINDFORMERS_REPO, "show", f"{tag}:{src}"], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"MindFormers source {tag}:{src} unavailable: {r.stderr.decode()[-200:]}")
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / dst).write_bytes(r.stdout)
    return str(root)


LLAMA3_REFERENCE = '''
import os
src, vocab, conv, seq, texts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
sys.path[:0] = [src, os.path.join(src, "research", "llama3")]
from research.llama3.llama3_tokenizer import Llama3Tokenizer
import llama_preprocess
tok = Llama3Tokenizer(vocab_file=vocab)
plain = [tok(t)["input_ids"] for t in texts]
tok.add_bos_token, tok.add_eos_token = True, True  # as llama_preprocess.py's main does
with open(conv) as f:
    data = llama_preprocess.preprocess([e["conversations"] for e in json.load(f)], tok, seq + 1)
print(json.dumps({"plain": plain, "input_ids": data["input_ids"].tolist(), "labels": data["labels"].tolist(),
                  "ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size]}))
'''


def test_llama3_tokenizer_and_preprocessing_equal_mindformers(workdir, tmp_path):
    """MindFormers v1.3.0 research/llama3: Llama3Tokenizer on the multilingual sample, and preprocess()
    of llama_preprocess.py on the same conversations, record for record."""
    d, tok_file, _, _ = workdir
    src = _mindformers_sources(tmp_path, {f"research/llama3/{f}": f"research/llama3/{f}"
                                          for f in ("llama3_tokenizer.py", "conversation.py", "llama_preprocess.py")})
    ref = json.loads(run_mindformers(LLAMA3_REFERENCE, src, tok_file, str(d / "conv.json"), str(SEQ),
                                     json.dumps(SAMPLE_TEXTS)).strip().splitlines()[-1])
    tok = Llama3Tokenizer(tok_file)
    assert ref["ids"] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size]
    assert ref["plain"] == [tok.encode(t, add_bos=False) for t in SAMPLE_TEXTS]
    ds = datasets.load_from_disk(str(d / "alpaca.mindrecord"))
    assert ds["input_ids"] == ref["input_ids"]
    assert ds["labels"] == ref["labels"]


FREQS_REFERENCE = '''
from mindformers.modules.layers import FreqsMgr
import mindspore as ms
scaling, seq = json.loads(sys.argv[1]), int(sys.argv[2])
mgr = FreqsMgr(head_dim=16, seq_length=seq, max_position_embedding=seq, rotary_dtype=ms.float32, theta=500000.0,
               scaling_factor=scaling, extend_method="LLAMA3")
print(json.dumps({"cos": mgr.freqs_cos.asnumpy().tolist(), "sin": mgr.freqs_sin.asnumpy().tolist()}))
'''


def test_llama3_rope_equals_mindformers_freqsmgr():
    """MindFormers' FreqsMgr with extend_method LLAMA3 (Llama 3.1's factors, original context 32) against
    mftune's tables for 96 positions: within float32 rounding (MindFormers computes in numpy)."""
    ref = json.loads(run_mindformers(FREQS_REFERENCE, json.dumps(SCALING), "96").strip().splitlines()[-1])
    args = model_args(LlamaConfig(hidden_size=64, num_heads=4, theta=500000.0, extend_method="LLAMA3",
                                  scaling_factor=dict(SCALING)))
    cos, sin = rope_cos_sin(args, 96, torch.device("cpu"))
    np.testing.assert_allclose(cos.numpy(), np.array(ref["cos"]), atol=1e-6)  # measured: 6e-8
    np.testing.assert_allclose(sin.numpy(), np.array(ref["sin"]), atol=1e-6)


WIKIPEDIA_REFERENCE = '''
from mindformers.models.llama.llama_tokenizer import LlamaTokenizer
from mindformers.dataset.dataloader.training_dataloader import TrainingDataset
vocab, data_dir, seq, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = LlamaTokenizer(vocab_file=vocab)
tok.add_bos_token, tok.add_eos_token = True, True  # as llama_preprocess.py's main does
ds = TrainingDataset(dataset_dir=data_dir, column_names=["input_ids"], max_length=seq + 1, file_format="parquet",
                     tokenizer=tok, is_align=True, samples_num=samples, shuffle=False, process_num=2)
print(json.dumps([[int(x) for x in item[0]] for item in ds]))
'''


def test_wikipedia_equals_mindformers_training_dataset(tmp_path):
    """--dataset_type wikipedia --samples_num N against MindFormers' TrainingDataset as its Llama 2
    llama_preprocess.py drives it, with N past one pass over the two files (they are read again)."""
    with open(SAMPLE_ALPACA_PATH) as f:
        records = json.load(f)[:40]
    texts = [f"{r['instruction']}\n  {r['output']}  \n\n" for r in records]
    (tmp_path / "wiki").mkdir()
    pq.write_table(pa.table({"text": texts[:25], "n": list(range(25))}), tmp_path / "wiki" / "a.parquet")
    pq.write_table(pa.table({"text": texts[25:]}), tmp_path / "wiki" / "b.parquet")
    vocab = train_sample_tokenizer(str(tmp_path / "sp"), 1000)
    seq, samples = 31, 90
    ref = json.loads(run_mindformers(WIKIPEDIA_REFERENCE, vocab, str(tmp_path / "wiki"), str(seq),
                                     str(samples)).strip().splitlines()[-1])
    r = run(["scripts/llama_preprocess.py", "--dataset_type", "wikipedia", "--input_glob", str(tmp_path / "wiki"),
             "--model_file", vocab, "--seq_length", str(seq), "--samples_num", str(samples),
             "--output_file", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    ours = datasets.load_from_disk(str(tmp_path / "out"))["input_ids"]
    assert len(ref) == samples and ours == ref
