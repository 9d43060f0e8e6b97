"""Packed training end to end: llama_preprocess.py --packing and packed raw files (real subprocesses).
Expected values: every unpacked sample is in exactly one packed record, and the packed run's per-sample
losses and gradients are those of the same samples unpacked."""
import json
import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
import yaml

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import unique_state_dict
from mftune.data.loader import TrainData
from mftune.data.preprocess import write_json_atomic
from mftune.data.records import convert_alpaca
from mftune.data.sample import SAMPLE_ALPACA_PATH, train_sample_tokenizer
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 384  # about four sample conversations (<= 97 tokens each) per record
VOCAB = 1000
MODEL = {"seq_length": SEQ, "max_position_embedding": SEQ, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
         "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 16, "compute_dtype": "float32",
         "param_init_type": "float32", "rotary_dtype": "float32", "layernorm_compute_type": "float32",
         "softmax_compute_type": "float32"}
RECORDS = 96


def run(args):
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The first RECORDS sample records as alpaca and conversation JSON, a tokenizer, and the
    conversations preprocessed at SEQ unpacked and packed (2 tokenizer processes)."""
    d = tmp_path_factory.mktemp("packing")
    with open(SAMPLE_ALPACA_PATH) as f:
        records = json.load(f)[:RECORDS]
    write_json_atomic(records, str(d / "alpaca.json"))
    write_json_atomic(convert_alpaca(records)[0], str(d / "conv.json"))
    tok = train_sample_tokenizer(str(d / "tok"), VOCAB)
    outputs = {}
    for name, extra in (("unpacked", []), ("packed", ["--packing", "--num_proc", "2"])):
        r = run(["scripts/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", str(d / "conv.json"),
                 "--model_file", tok, "--seq_length", str(SEQ), "--output_file", str(d / name), *extra])
        assert r.returncode == 0, r.stderr
        outputs[name] = r.stdout
    return d, tok, outputs


def _samples(row: dict) -> list[tuple[tuple, tuple]]:
    """(input_ids, labels) of each sample of a packed record (split where position_ids restart),
    without the padding tail."""
    ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    out = []
    for a, b in zip(starts, starts[1:]):
        assert pos[a:b] == list(range(b - a))
        if any(ids[a:b]):  # not the padding tail
            out.append((tuple(ids[a:b]), tuple(labels[a:b])))
        else:
            assert set(labels[a:b]) == {-100}
    return out


def _unpadded(row: dict) -> tuple[tuple, tuple]:
    n = len(row["input_ids"])
    while n and row["input_ids"][n - 1] == 0:  # every sample ends with </s>; pad (0) follows
        n -= 1
    return tuple(row["input_ids"][:n]), tuple(row["labels"][:n])


def test_packed_records_hold_every_unpacked_sample_once(workdir):
    d, _, outputs = workdir
    packed = datasets.load_from_disk(str(d / "packed"))
    unpacked = datasets.load_from_disk(str(d / "unpacked"))
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert {len(r) for c in packed.column_names for r in packed[c]} == {SEQ + 1}
    samples = [s for row in packed for s in _samples(row)]
    assert sorted(samples) == sorted(_unpadded(row) for row in unpacked)
    assert all(labels[0] == -100 for _, labels in samples)  # no prediction crosses a sample boundary
    assert len(packed) <= math.ceil(len(unpacked) / 3)
    line = outputs["packed"]
    assert f"Transformed {len(packed)} records. Packed {RECORDS} samples into them;" in line
    assert " tokens/s." in line and "filled" in line


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(dict(MODEL))
    get_pet_model(model, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                          "target_modules": ".*wq|.*wk|.*wv|.*wo"})
    for name, p in model.named_parameters():  # non-zero B, so the adapters shape the loss
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_packed_losses_and_gradients_equal_unpacked(workdir):
    """Each sample of two packed records: its loss equals the unpacked record's; the gradients of
    the packed batch's summed loss equal the sum over the unpacked records."""
    d, _, _ = workdir
    packed = datasets.load_from_disk(str(d / "packed")).select(range(2))
    unpacked = datasets.load_from_disk(str(d / "unpacked"))
    index = {_unpadded(row): i for i, row in enumerate(unpacked)}
    model = _model(0)
    ids = torch.tensor(packed["input_ids"])
    labels = torch.tensor(packed["labels"])
    positions = torch.tensor(packed["position_ids"])
    members = []
    for r, row in enumerate(packed):
        at = 0
        for sample in _samples(row):
            n = len(sample[0])
            members.append((r, at, n, index[sample]))
            at += n
    assert len(members) >= 6
    with torch.no_grad():
        for r, at, n, u in members:
            only = torch.full_like(labels[r:r + 1], -100)
            only[0, at:at + n] = labels[r, at:at + n]
            got, count = model(ids[r:r + 1], only, reduction="sum", positions=positions[r:r + 1],
                               packed=True)
            row = unpacked[u]
            want, want_count = model(torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]]), reduction="sum")
            assert int(count) == int(want_count) > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        alone, _ = model(ids, labels, reduction="sum")  # without positions: samples see each other
        packed_sum, _ = model(ids, labels, reduction="sum", positions=positions, packed=True)
        assert abs(float(alone) - float(packed_sum)) > 1e-3

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_grads = grads(model(ids, labels, reduction="sum", positions=positions, packed=True)[0])
    rows = unpacked.select([u for *_, u in members])
    unpacked_grads = grads(model(torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"]), reduction="sum")[0])
    assert packed_grads.keys() == unpacked_grads.keys() and len(packed_grads) == 16
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], unpacked_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_raw_alpaca_trains_with_the_per_sample_loss(workdir, tmp_path):
    """run_finetune.py on alpaca.json with data_loader.packing: packed into the cache, and the first
    step's loss is the token-weighted mean of its samples' losses computed one sample at a time
    (LoRA B starts at 0, so step 1 runs the base model). The same raw file, unpacked, is the eval set
    (do_eval at the end of the epoch)."""
    d, tok, _ = workdir
    torch.manual_seed(1)
    base = LlamaForCausalLM(dict(MODEL))
    save_complete(str(tmp_path / "base.safetensors"), unique_state_dict(base), model_config=base.config.to_dict())
    with open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"].update(MODEL)
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["train_dataset"]["data_loader"].update({"dataset_dir": str(d / "alpaca.json"), "packing": True})
    cfg["runner_config"].update({"epochs": 1, "batch_size": 4})
    cfg["eval_dataset"]["data_loader"]["dataset_dir"] = str(d / "alpaca.json")
    cfg["eval_dataset"]["batch_size"] = 8
    cfg.update({"do_eval": True, "eval_step_interval": -1, "eval_epoch_interval": 1})
    cfg["processor"]["tokenizer"]["vocab_file"] = tok
    cfg["load_checkpoint"] = str(tmp_path / "base.safetensors")
    config = tmp_path / "packed.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    r = run(["run_finetune.py", "--config", str(config), "--run_mode", "finetune", "--use_parallel", "False",
             "--output_dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "real_tokens/s:" in r.stdout + r.stderr
    caches = [TrainData(str(out / "dataset_cache" / c), micro_batch_size=4, seed=cfg["seed"])
              for c in sorted(os.listdir(out / "dataset_cache"))]
    (data,), (unpacked,) = [c for c in caches if c.packed], [c for c in caches if not c.packed]
    assert unpacked.num_records == RECORDS and data.num_records <= math.ceil(RECORDS / 3)
    with open(out / "eval_metrics.jsonl") as f:
        (evaluation,) = [json.loads(line) for line in f]
    assert evaluation["records"] == RECORDS and math.isfinite(evaluation["ppl"])
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    batch = next(data.epoch(0))[0]
    real = int((batch["input_ids"][:, :-1] != 0).sum())  # step 1's non-pad inputs of its 4 x SEQ positions
    assert metrics[0]["real_tokens_per_s"] / metrics[0]["tokens_per_s"] == pytest.approx(real / (4 * SEQ))
    assert real < 4 * SEQ
    total, count = 0.0, 0
    with torch.no_grad():
        for r_ids, r_labels, r_pos in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                          batch["position_ids"].tolist()):
            for ids, labels in _samples({"input_ids": r_ids, "labels": r_labels, "position_ids": r_pos}):
                loss, n = base(torch.tensor([ids]), torch.tensor([labels]), reduction="sum")
                total, count = total + float(loss), count + int(n)
    assert metrics[0]["loss"] == pytest.approx(total / count, rel=1e-5)
