"""The user's path end to end, through the real commands (subprocesses).

The config is reference/mindformers.md §1.1 (configs/llama2/lora_llama2_7b.yaml) with only the
model sizes, seq_length, dataset and output paths changed, as the foundation issue requires.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.data.loader import TrainData
from mftune.data.sample import SAMPLE_ALPACA_PATH, train_sample_tokenizer
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 96
VOCAB = 1000  # the sample tokenizer at 1000 fits every templated record in 97 tokens
SIZES = {"seq_length": SEQ, "max_position_embedding": SEQ, "hidden_size": 64, "num_layers": 2,
         "num_heads": 4, "vocab_size": VOCAB, "multiple_of": 16}


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Alpaca sample (first 120 records) -> conversations -> tokenizer -> tokenized dataset."""
    d = tmp_path_factory.mktemp("e2e")
    with open(SAMPLE_ALPACA_PATH) as f:
        records = json.load(f)[:120]
    alpaca = d / "alpaca.json"
    alpaca.write_text(json.dumps(records))
    conv = d / "conv.json"
    r = run(["scripts/alpaca_converter.py", "--data_path", str(alpaca), "--output_path", str(conv)])
    assert r.returncode == 0, r.stderr
    tok = train_sample_tokenizer(str(d / "tok"), VOCAB)
    data = d / f"alpaca{SEQ}.mindrecord"
    r = run(["scripts/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", str(conv),
             "--model_file", tok, "--seq_length", str(SEQ), "--output_file", str(data)])
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")))
    cfg["model"]["model_config"].update(SIZES)
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = str(data)
    cfg["output_dir"] = str(d / "output")
    config = d / "lora_llama2_small.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return d, config, data


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _dataset_loss(model, data_dir):
    """Mean token loss over the whole dataset, computed outside the trainer."""
    data = TrainData(str(data_dir), micro_batch_size=8, shuffle=False, drop_remainder=False)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for (mb,) in data.epoch(0):
            s, n = model(mb["input_ids"], mb["labels"], reduction="sum")
            total, count = total + float(s), count + int(n)
    return total / count


FULL = ("--model.model_config.pet_config", "null")  # every parameter trains (no pet_config)


def test_train_then_finetune_from_its_checkpoint(workdir):
    d, config, data = workdir
    base_out, lora_out = d / "base", d / "lora"
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "train", *FULL,
             "--use_parallel", "False", "--output_dir", str(base_out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # 120 records, runner batch_size 2 -> 60 steps per epoch, 2 epochs (values of §1.1).
    lines = [l for l in r.stdout.splitlines() if "{ Epoch:[" in l]
    assert len(lines) == 120
    assert re.search(r"\{ Epoch:\[  2/  2\], step:\[   60/   60\], loss: \d+\.\d{3}, per_step_time: \d+ms, "
                     r"lr: \[[^\]]+\], overflow cond: False, loss_scale: 1\.0, global_norm: \[[^\]]+\], "
                     r"tokens/s: [\d.]+, real_tokens/s: [\d.]+, peak_mem: [\d.]+MB$", lines[-1])
    metrics = _metrics(base_out)
    assert [m["step"] for m in metrics] == list(range(1, 121))
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= metrics[0].keys()
    first, last = metrics[:20], metrics[-20:]
    assert sum(m["loss"] for m in last) < sum(m["loss"] for m in first)  # the loss falls
    ckpt_dir = base_out / "checkpoint" / "rank_0"
    # save_checkpoint_steps 100 -> step 100 (epoch 2, step 40) and the final step 120.
    assert sorted(os.listdir(ckpt_dir)) == ["llama_7b_lora_rank_0-2_40.safetensors",
                                            "llama_7b_lora_rank_0-2_60.safetensors", "meta.json"]
    base_ckpt = str(ckpt_dir / "llama_7b_lora_rank_0-2_60.safetensors")
    assert read_metadata(base_ckpt)["model_config"]["hidden_size"] == 64
    assert (base_out / "resolved_config.yaml").exists()
    info = (base_out / "log/rank_0/info.log").read_text()
    assert "Ignored on this backend" in info and "{ Epoch:[  2/  2], step:[   60/   60]" in info

    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "finetune",
             "--use_parallel", "False", "--output_dir", str(lora_out), "--load_checkpoint", base_ckpt])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trainable params: 16,384 || all params:" in r.stdout  # 2 layers x 4 targets x 2 x 16 x 64
    lora_ckpt = str(lora_out / "checkpoint/rank_0/llama_7b_lora_rank_0-2_60.safetensors")
    tensors = load_tensors(lora_ckpt)
    adapters = [k for k in tensors if "mindpet_delta_lora" in k and not k.startswith("adam_")]
    assert len(adapters) == 16 and "model.layers.0.attention.wq.weight" not in tensors
    meta = read_metadata(lora_ckpt)
    assert meta["pet_config"]["lora_rank"] == 16 and meta["base_checkpoint"]["path"] == base_ckpt

    # Independent check: the whole-dataset loss falls in both stages.
    sizes = dict(yaml.safe_load(open(config))["model"]["model_config"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(sizes)
    init_loss = _dataset_loss(model, data)
    model.load_state_dict(load_tensors(base_ckpt, list(model.state_dict())))
    base_loss = _dataset_loss(model, data)
    get_pet_model(model, sizes["pet_config"])
    model.load_state_dict({k: v for k, v in tensors.items() if "mindpet_delta_lora" in k and
                           not k.startswith("adam_")}, strict=False)
    lora_loss = _dataset_loss(model, data)
    assert lora_loss < base_loss < init_loss

    # predict from the LoRA run's checkpoint directory: its header names the base, loaded first;
    # greedy output = the model above (base + adapters) decoding by hand, one full forward per token
    from mftune.data.tokenizer import LlamaTokenizer
    tok = str(d / "tok.model")
    prompt = "Give three tips for staying healthy."
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "predict", "--use_parallel", "False",
             "--output_dir", str(d / "predict"), "--load_checkpoint", str(lora_out / "checkpoint"),
             "--processor.tokenizer.vocab_file", tok, "--predict_data", prompt,
             "--model.model_config.max_decode_length", "40"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Loading the base checkpoint" in r.stdout + r.stderr
    result = json.loads((d / "predict" / "predict_results.jsonl").read_text())
    ids = LlamaTokenizer(tok).encode(prompt, add_bos=True)
    assert result["input_ids"] == ids
    model.eval()
    with torch.no_grad():
        out = []
        while len(ids) + len(out) < 40 and (not out or out[-1] != 2):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    assert result["output_ids"] == out


def test_gradient_accumulation_equals_one_big_batch(workdir):
    """(batch 4, GA 1) and (batch 2, GA 2) see the same samples per step; the token-weighted loss
    and the update must agree to float rounding."""
    d, config, _ = workdir
    losses = []
    for name, bs, ga in (("ga1", 4, 1), ("ga2", 2, 2)):
        out = d / name
        r = run(["run_finetune.py", "--config", str(config), "--run_mode", "train", *FULL, "--use_parallel", "False",
                 "--output_dir", str(out), "--epochs", "1", "--batch_size", str(bs),
                 "--gradient_accumulation_steps", str(ga), "--model.model_config.compute_dtype", "float32"])
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append([m["loss"] for m in _metrics(out)])
    assert len(losses[0]) == 30
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("args, expect", [
    (["--model.model_config.pet_config.lora_rank", "0"], "model.model_config.pet_config.lora_rank=0"),
    (["--model.model_config.num_heads", "5"], "num_heads"),
    (["--options", "runner_config.epochz=3"], "did you mean 'epochs'"),
    (["--run_mode", "pretrain"], "run_mode"),
    (["--train_dataset_dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--load_checkpoint", "/nonexistent/base.safetensors"], "/nonexistent/base.safetensors"),
    (["--model.model_config.seq_length", "64"], "seq_length=64"),
    (["--use_parallel", "maybe"], "use_parallel"),
    (["--model.model_config.vocab_size", "300"], "vocab_size=300"),
    (["--model.model_config.theta", "0"], "theta=0"),
    (["--output_dir", "run_finetune.py"], "output_dir=run_finetune.py cannot be written"),
    (["--resume_training", "True"], "resume_training is set but load_checkpoint is empty"),
    (["--auto_trans_ckpt", "True", "--load_checkpoint", ""], "auto_trans_ckpt=True needs a checkpoint"),
    (["--model.model_config.pet_config.target_modules", ".*q_proj"], "q_proj"),
    (["--options", "model.model_config.pet_config.freeze_include=['*']"], "no trainable parameters"),
])
def test_user_mistakes_exit_2_without_traceback(workdir, args, expect):
    """Each mistake must fail fast with exit status 2, no traceback, and name the key or file."""
    _, config, _ = workdir
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "finetune",
             "--use_parallel", "False", *args])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and expect in r.stderr, r.stderr


def test_half_precision_weights_train_with_fp32_masters(workdir, tmp_path):
    """param_init_type float16 (lora_llama2_13b.yaml's setting): frozen weights stay fp16, the
    adapters train in fp32 (FP32StateAdamWeightDecay); every logged loss is finite."""
    _, config, _ = workdir
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "finetune", "--use_parallel", "False",
             "--output_dir", str(tmp_path), "--epochs", "1", "--train_dataset.data_loader.num_samples", "16",
             "--model.model_config.param_init_type", "float16", "--model.model_config.compute_dtype", "float16"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    tensors = load_tensors(str(tmp_path / "checkpoint/rank_0/llama_7b_lora_rank_0-1_8.safetensors"))
    assert tensors["model.layers.0.attention.wq.mindpet_delta_lora_a"].dtype == torch.float32
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_diverging_run_stops_with_a_message(workdir, tmp_path):
    _, config, _ = workdir
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "train", *FULL, "--use_parallel", "False",
             "--output_dir", str(tmp_path), "--epochs", "1", "--lr_schedule.learning_rate", "1e30",
             "--lr_schedule.warmup_ratio", "0"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not finite for 5 consecutive steps" in r.stderr


def test_progress_bar_on_a_terminal(workdir, tmp_path):
    """On a terminal (a pty with a window size) a tqdm bar counts the steps; logs still print."""
    import fcntl
    import pty
    import struct
    import termios

    _, config, _ = workdir
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "run_finetune.py", "--config", str(config), "--run_mode", "train", *FULL,
                             "--use_parallel", "False", "--output_dir", str(tmp_path), "--epochs", "1",
                             "--train_dataset.data_loader.num_samples", "16"],
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait() == 0, out[-2000:]
    text = out.decode(errors="replace")
    assert re.search(r"train: +100%\|.*\| 8/8 ", text), text[-2000:]
    assert "{ Epoch:[  1/  1], step:[    8/    8]" in text


def test_raw_alpaca_json_trains_without_preprocessing_and_is_cached(workdir, tmp_path):
    """--train_dataset_dir alpaca.json: tokenized on first use into output_dir/dataset_cache (the
    same records as alpaca_converter.py + llama_preprocess.py give), reused by the second run."""
    d, config, data = workdir
    args = ["run_finetune.py", "--config", str(config), "--run_mode", "finetune", "--use_parallel", "False",
            "--output_dir", str(tmp_path), "--epochs", "1", "--train_dataset.data_loader.num_samples", "16",
            "--train_dataset_dir", str(d / "alpaca.json"), "--processor.tokenizer.vocab_file", str(d / "tok.model")]
    r = run(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tokenized into" in r.stdout + r.stderr
    (cache,) = os.listdir(tmp_path / "dataset_cache")
    ours = TrainData(str(tmp_path / "dataset_cache" / cache), micro_batch_size=1, shuffle=False)
    script = TrainData(str(data), micro_batch_size=1, shuffle=False)
    assert ours.num_records == script.num_records == 120
    idx = torch.arange(120)
    assert all(torch.equal(ours.rows(idx)[c], script.rows(idx)[c]) for c in ("input_ids", "labels"))
    first = _metrics(tmp_path)
    r = run(args)
    assert r.returncode == 0 and "using the tokenized cache" in r.stdout + r.stderr
    assert [m["loss"] for m in _metrics(tmp_path)] == [m["loss"] for m in first]
    r = run(args[:-2])  # no tokenizer
    assert r.returncode == 2 and "processor.tokenizer.vocab_file" in r.stderr and "Traceback" not in r.stderr
