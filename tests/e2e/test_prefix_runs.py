"""MindFormers' prefix-tuning, P-tuning v2 and S-LoRA Llama2 YAMLs (v1.3.0, tests/fixtures) as a user runs them:
placeholder paths replaced, the model shrunk, one process. finetune trains only the prefix and saves it (with its base
recorded); eval and predict take that checkpoint as load_checkpoint, as MindFormers' predict YAML does, and apply the
recorded prefix; the predicted tokens are the ones mftune.generation gives on the same weights.
scripts/transform_ckpt_lora.py says there is nothing to merge. S-LoRA predicts with one adapter per prompt
(--adapter_id, or a prompts file's adapter_id fields), each prompt's output the one its adapter gives alone."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
import yaml

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import load_checkpoint, unique_state_dict
from mftune.data.sample import train_sample_tokenizer
from mftune.data.tokenizer import LlamaTokenizer
from mftune.generation import generate
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mindformers", "v1.3.0", "configs", "llama2")
SEQ, VOCAB = 32, 1000
SIZES = {"seq_length": SEQ, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": VOCAB,
         "multiple_of": 16, "compute_dtype": "float32", "param_init_type": "float32", "use_flash_attention": False,
         "max_decode_length": 20, "do_sample": False}
METHODS = ("prefixtuning", "ptuning2")


def run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A sentencepiece tokenizer, 16 labelled records, a random tiny base."""
    d = tmp_path_factory.mktemp("prefix_runs")
    vocab = train_sample_tokenizer(str(d / "sp"), VOCAB)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (16, SEQ + 1), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).save_to_disk(str(d / "data"))
    torch.manual_seed(1)
    base = LlamaForCausalLM(dict(SIZES))
    save_complete(str(d / "base.safetensors"), unique_state_dict(base), model_config=base.config.to_dict())
    return d, vocab


def _yaml(d, vocab: str, name: str, **top) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"].update(SIZES)
    for split in ("train_dataset", "eval_dataset"):
        cfg[split]["data_loader"]["dataset_dir"] = str(d / "data")
        cfg[split]["batch_size"] = 4
    cfg["runner_config"].update({"epochs": 1, "batch_size": 4, "sink_mode": False})
    cfg["processor"]["tokenizer"]["vocab_file"] = vocab
    cfg.update(use_parallel=False, **top)
    path = d / f"small_{name}"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_finetune_eval_predict_with_mindformers_yamls(workdir, method):
    d, vocab = workdir
    out = d / f"{method}_finetune"
    r = run(["run_finetune.py", "--config", _yaml(d, vocab, f"finetune_llama2_7b_{method}.yaml",
                                                  load_checkpoint=str(d / "base.safetensors")),
             "--run_mode", "finetune", "--output_dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    (ckpt,) = [f for f in os.listdir(out / "checkpoint" / "rank_0") if f.endswith(".safetensors")]
    ckpt = str(out / "checkpoint" / "rank_0" / ckpt)
    saved = LlamaForCausalLM(dict(SIZES))
    pet_config = yaml.safe_load(open(os.path.join(FIXTURES, f"finetune_llama2_7b_{method}.yaml")))[
        "model"]["model_config"]["pet_config"]
    get_pet_model(saved, pet_config)
    report = load_checkpoint(saved, ckpt)  # the prefix, over the base its header records
    assert report["base"]["path"] == str(d / "base.safetensors")
    assert sorted(n for n in report["loaded"] if "mindpet_delta" in n) == sorted(
        n for n, p in saved.named_parameters() if p.requires_grad)

    r = run(["run_finetune.py", "--config", _yaml(d, vocab, f"finetune_llama2_7b_{method}.yaml",
                                                  load_checkpoint=ckpt, do_eval=True),
             "--run_mode", "eval", "--output_dir", str(d / f"{method}_eval")])
    assert r.returncode == 0 and "loss" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]

    predict_yaml = f"predict_llama2_7b_{method}.yaml"
    r = run(["run_finetune.py", "--config", _yaml(d, vocab, predict_yaml, load_checkpoint=ckpt),
             "--run_mode", "predict", "--output_dir", str(d / f"{method}_predict"), "--predict_data",
             "Give three tips.", "--use_parallel", "False"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(d / f"{method}_predict" / "predict_results.jsonl") as f:
        (result,) = [json.loads(line) for line in f]
    tok = LlamaTokenizer(vocab)
    expected = generate(saved.eval(), [result["input_ids"]], max_new_tokens=20 - len(result["input_ids"]),
                        eos_token_id=tok.eos_token_id, pad_token_id=0)[0]
    assert result["output_ids"] == expected


def test_predict_without_a_prefix_is_refused(workdir, tmp_path):
    """A prefix pet_config over a checkpoint without the prefix (the base): predict would use a random prefix, unlike
    LoRA's fresh B = 0; exit 2 naming it."""
    d, vocab = workdir
    r = run(["run_finetune.py", "--config", _yaml(d, vocab, "predict_llama2_7b_prefixtuning.yaml",
                                                  load_checkpoint=str(d / "base.safetensors")),
             "--run_mode", "predict", "--output_dir", str(tmp_path / "out"), "--predict_data", "Hi"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "holds no prefix (mindpet_delta_prefixtuning_embedding.embedding_table" in r.stderr


def _peft_adapter(directory, r: int, alpha: float, seed: int) -> None:
    """A PEFT LoRA adapter on q_proj / v_proj of the tiny model, written as peft saves one."""
    from mftune.checkpoint.safetensors_io import save_safetensors

    g = torch.Generator().manual_seed(seed)
    hidden, layers = SIZES["hidden_size"], SIZES["num_layers"]
    tensors = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{x}.weight":
               torch.randn(shape, generator=g) * 0.3
               for i in range(layers) for m in ("q_proj", "v_proj") for x, shape in (("A", (r, hidden)),
                                                                                       ("B", (hidden, r)))}
    os.makedirs(directory)
    save_safetensors(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
                   "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}, f)


def test_slora_yaml_predicts_one_adapter_per_prompt(workdir, tmp_path):
    """predict_llama2_7b_slora.yaml with two adapters: a prompts file's adapter_id per line (one line without: the
    base), then --adapter_id for every prompt; each output equals that adapter's single-LoRA predict."""
    d, vocab = workdir
    for name, r, alpha, seed in (("a", 4, 8, 1), ("b", 2, 16, 2)):
        _peft_adapter(str(tmp_path / name), r, alpha, seed)
    (tmp_path / "adapters.json").write_text(json.dumps({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}))
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Give three tips.", "adapter_id": "b"}, {"prompt": "Give three tips.", "adapter_id": "a"},
            {"prompt": "Give three tips."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _yaml(d, vocab, "predict_llama2_7b_slora.yaml", load_checkpoint=str(d / "base.safetensors"))
    slora = ["--model.model_config.pet_config.adapter_path", str(tmp_path / "adapters.json")]
    r = run(["run_finetune.py", "--config", config, "--run_mode", "predict", "--output_dir", str(tmp_path / "mixed"),
             "--predict_data", str(prompts), *slora])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 of 3 prompts have no adapter_id: they use the base model alone" in r.stdout + r.stderr
    with open(tmp_path / "mixed" / "predict_results.jsonl") as f:
        mixed = [json.loads(line) for line in f]
    assert [m["adapter_id"] for m in mixed] == ["b", "a", None]
    alone = {}
    for name in ("a", "b"):  # the adapter with its base beside it (docs/checkpoints.md), its settings applied
        out, both = tmp_path / f"alone_{name}", tmp_path / f"{name}_with_base"
        shutil.copytree(tmp_path / name, both)
        shutil.copy(d / "base.safetensors", both / "base.safetensors")
        r = run(["run_finetune.py", "--config", _yaml(d, vocab, "predict_llama2_7b_prefixtuning.yaml",
                                                      load_checkpoint=str(both)),
                 "--run_mode", "predict", "--output_dir", str(out), "--predict_data", "Give three tips.",
                 "--model.model_config.pet_config", "null"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        alone[name] = json.loads((out / "predict_results.jsonl").read_text())["output_ids"]
    assert [m["output_ids"] for m in mixed[:2]] == [alone["b"], alone["a"]] and alone["a"] != alone["b"]
    r = run(["run_finetune.py", "--config", config, "--run_mode", "predict", "--output_dir", str(tmp_path / "cli"),
             "--predict_data", "Give three tips.", "--adapter_id", "b", *slora])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "cli" / "predict_results.jsonl").read_text())["output_ids"] == alone["b"]
    r = run(["run_finetune.py", "--config", config, "--run_mode", "predict", "--output_dir", str(tmp_path / "bad"),
             "--predict_data", "Hi", "--adapter_id", "c", *slora])
    assert r.returncode == 2 and "adapter_id 'c' is not an adapter" in r.stderr and "Traceback" not in r.stderr


def test_merge_tool_says_a_prefix_has_nothing_to_merge(workdir, tmp_path):
    d, _ = workdir
    model = LlamaForCausalLM(dict(SIZES))
    get_pet_model(model, {"pet_type": "ptuning2", "pre_seq_len": 4})
    prefix = {k: v for k, v in model.state_dict().items() if "mindpet_delta" in k}
    save_complete(str(tmp_path / "prefix.safetensors"), prefix, model_config=model.config.to_dict())
    r = run(["scripts/transform_ckpt_lora.py", "--src_ckpt_path_or_dir", str(tmp_path / "prefix.safetensors"),
             "--base_checkpoint", str(d / "base.safetensors"), "--dst_ckpt_dir", str(tmp_path / "merged")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "prefix" in r.stderr and "nothing to merge" in r.stderr, r.stderr[-2000:]
