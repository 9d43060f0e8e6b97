"""--run_mode predict through run_finetune.py: a random Hugging Face Llama loaded from its directory,
greedy generation compared token for token with transformers' generate on the same weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

from mftune.checkpoint.names import hf_config_to_model_config
from mftune.data.sample import train_sample_tokenizer
from mftune.data.tokenizer import LlamaTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 1000
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France? Answer briefly please"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    tok = train_sample_tokenizer(str(d / "tok"), VOCAB)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # a larger spread than the default init: varied, decisive argmaxes
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    hf.save_pretrained(d / "hf")
    with open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")) as f:
        cfg = yaml.safe_load(f)
    mc = cfg["model"]["model_config"]
    mc.update(hf_config_to_model_config(hf_cfg.to_dict()))
    mc.update({"compute_dtype": "float32", "param_init_type": "float32", "seq_length": 128,
               "max_decode_length": 24})
    cfg["processor"]["tokenizer"]["vocab_file"] = tok
    cfg["load_checkpoint"] = str(d / "hf")
    config = d / "predict.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return d, config, hf, LlamaTokenizer(tok)


def _hf_greedy(hf, ids: list[int]) -> list[int]:
    """transformers' greedy continuation of ``ids`` up to max_decode_length 24 (prompt included)."""
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=24 - len(ids), eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _predict(config, out, *args):
    return subprocess.run([sys.executable, "run_finetune.py", "--config", str(config), "--run_mode", "predict",
                           "--use_parallel", "False", "--output_dir", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_greedy_predict_equals_transformers_generate(setup, tmp_path):
    d, config, hf, tokenizer = setup
    r = _predict(config, tmp_path, "--predict_data", *PROMPTS, "--predict_batch_size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "predict_results.jsonl") as f:
        results = [json.loads(line) for line in f]
    assert [x["prompt"] for x in results] == PROMPTS
    for x in results:
        ids = tokenizer.encode(x["prompt"], add_bos=True)
        assert x["input_ids"] == ids
        budget = 24 - len(ids)  # max_decode_length counts the prompt
        assert x["output_ids"] == _hf_greedy(hf, ids)
        assert 0 < len(x["output_ids"]) <= budget
        assert x["text"] == tokenizer.decode(x["output_ids"])
        assert f"output: {x['text']}" in r.stdout
    # a prompts file, one per line, gives the same results (batch 1: no padding)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    r = _predict(config, tmp_path / "file", "--predict_data", str(prompts))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "file" / "predict_results.jsonl") as f:
        assert [json.loads(line)["output_ids"] for line in f] == [x["output_ids"] for x in results]


@pytest.mark.parametrize("args, expect", [
    (["--processor.tokenizer.vocab_file", ""], "processor.tokenizer.vocab_file is empty"),
    ([], "run_mode predict needs prompts"),
    (["--predict_data", "a long prompt " * 20], "max_decode_length=24 is invalid"),
])
def test_predict_mistakes_exit_2(setup, tmp_path, args, expect):
    _, config, _, _ = setup
    r = _predict(config, tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and expect in r.stderr, r.stderr[-2000:]


def test_predict_on_4_ranks_equals_one_process(setup, tmp_path):
    """(dp 2 x mp 2) with FSDP2, the vocabulary-parallel lm_head and use_seq_parallel (switched off
    for decoding): the same greedy tokens as transformers' generate; rank 0 writes the results."""
    d, config, hf, tokenizer = setup
    import parity as pp

    args = ["run_finetune.py", "--config", str(config), "--run_mode", "predict", "--use_parallel", "True",
            "--output_dir", str(tmp_path), "--predict_data", *[f"'{p}'" for p in PROMPTS], "--predict_batch_size", "2",
            "--parallel_config.data_parallel", "2", "--parallel_config.model_parallel", "2",
            "--parallel.enable_parallel_optimizer", "True", "--parallel_config.use_seq_parallel", "True",
            "--parallel_config.vocab_emb_dp", "False"]
    r = subprocess.run(["bash", "scripts/launcher.sh", " ".join(args), "4", str(pp.free_port()),
                        str(tmp_path / "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "predict_results.jsonl") as f:
        results = [json.loads(line) for line in f]
    assert [x["prompt"] for x in results] == PROMPTS
    for x in results:
        ids = tokenizer.encode(x["prompt"], add_bos=True)
        assert x["output_ids"] == _hf_greedy(hf, ids)
    with open(tmp_path / "log" / "rank_0" / "info.log") as f:
        assert "use_seq_parallel is off" in f.read()
    workers = [(tmp_path / "msrun_log" / f"worker_{r}.log").read_text() for r in range(4)]
    assert "output: " in workers[0] and not any("output: " in w for w in workers[1:])  # rank 0 reports


def test_slora_predict_on_4_ranks_equals_one_process(setup, tmp_path):
    """S-LoRA (pet_type slora, docs/pet.md) under (dp 2 x mp 2) with a vocabulary-parallel lm_head: two adapters
    peft saved (column- and row-parallel layers, one on lm_head too), one per prompt: the one-process tokens."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    import parity as pp

    d, config, hf, _ = setup
    adapters = {}
    for i, targets in enumerate((["q_proj", "o_proj", "down_proj"], ["v_proj", "up_proj", "lm_head"])):
        peft_model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(d / "hf"),
                                    PeftLoraConfig(r=2 + 2 * i, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        peft_model.save_pretrained(tmp_path / f"adapter{i}")
        adapters[f"task{i}"] = str(tmp_path / f"adapter{i}")
    (tmp_path / "adapters.json").write_text(json.dumps(adapters))
    slora = ["--adapter_id", "task1", "task0", "--predict_batch_size", "2"]
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["model_config"]["pet_config"] = {"pet_type": "slora", "adapter_path": str(tmp_path / "adapters.json")}
    (tmp_path / "slora.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = _predict(tmp_path / "slora.yaml", tmp_path / "one", "--predict_data", *PROMPTS, *slora)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    args = ["run_finetune.py", "--config", str(tmp_path / "slora.yaml"), "--run_mode", "predict", "--use_parallel",
            "True", "--output_dir", str(tmp_path / "four"), "--predict_data", *[f"'{p}'" for p in PROMPTS], *slora,
            "--parallel_config.data_parallel", "2",
            "--parallel_config.model_parallel", "2", "--parallel.enable_parallel_optimizer", "True",
            "--parallel_config.vocab_emb_dp", "False"]
    r = subprocess.run(["bash", "scripts/launcher.sh", " ".join(args), "4", str(pp.free_port()),
                        str(tmp_path / "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, four = ([json.loads(line) for line in (tmp_path / out / "predict_results.jsonl").read_text().splitlines()]
                 for out in ("one", "four"))
    assert [x["adapter_id"] for x in four] == ["task1", "task0"]
    assert [x["output_ids"] for x in four] == [x["output_ids"] for x in one]
    assert [x["prompt"] for x in four] == PROMPTS and len(four[0]["output_ids"]) > 3
