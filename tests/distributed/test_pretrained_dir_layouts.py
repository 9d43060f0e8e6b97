"""``--pretrained_model_dir`` under the launcher: a Llama 3-style Hugging Face directory (tied embeddings,
GQA, llama3 RoPE; tests/hf_llama3_dir.py) and a raw alpaca file tokenized with its chat template, LoRA
fine-tuned (and fully trained: the tied table is then trained through both of its uses) on 4 ranks in (2, 2)
with FSDP2, sequence and vocabulary parallel and recompute.

Expected numbers: the one-process run of the same command (tests/parity.py's tolerance ``pp.RTOL``, both
the loss and the gradient norm, 4 steps)."""
import json
import os

import pytest
from hf_llama3_dir import llama3_style_dir

import parity as pp

CONFIG = os.path.join(pp.ROOT, "configs", "llama3", "lora_pretrained_dir.yaml")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained_layouts")
    directory, _, _ = llama3_style_dir(str(d / "model"))
    data = str(d / "alpaca.json")
    records = [{"instruction": f"Say {a} then {b}.", "input": "", "output": f"{a.title()}, {b}."}
               for a in WORDS for b in WORDS[:2]]  # 16 records: 2 steps of 8 per epoch
    with open(data, "w") as f:
        json.dump(records, f)
    return d, {"pretrained_model_dir": directory, "train_dataset_dir": data, "epochs": 2,
               "model.model_config.seq_length": 40, "train_dataset.data_loader.shuffle": False,
               "optimizer.learning_rate": 1e-2, "lr_schedule.learning_rate": 1e-2,
               "model.model_config.pet_config.lora_dropout": 0.0}  # dropout draws differ by layout


@pytest.mark.parametrize("run_mode", ["finetune", "train"])  # LoRA; every parameter (the tied table too)
def test_two_by_two_with_everything_on_equals_one_process(workdir, run_mode):
    d, options = workdir
    if run_mode == "train":  # no pet_config at all
        options = {k: v for k, v in options.items() if "pet_config" not in k}
    one = str(d / f"one-{run_mode}")
    r = pp.run_single(CONFIG, run_mode, one, options)
    assert r.returncode == 0, r.stderr[-3000:]
    four = str(d / f"four-{run_mode}")
    r = pp.run_layout(CONFIG, run_mode, four, 2, 2, {**options, **pp.ALL_ON})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(pp.losses(one)) == 4
    for key in ("loss", "global_norm"):
        assert pp.compare(pp.losses(one, key), pp.losses(four, key)) <= pp.RTOL, key
