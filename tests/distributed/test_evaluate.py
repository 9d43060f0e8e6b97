"""--run_mode eval and do_eval: perplexity against exp(mean token loss) computed here with
torch's cross_entropy on the model's logits, on one process and on 4 ranks; packed records
(several samples per record) against each sample scored alone."""
import json
import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

from mftune.checkpoint.load import load_checkpoint  # noqa: E402
from mftune.data.loader import TrainData  # noqa: E402
from mftune.data.packing import pack_dataset  # noqa: E402
from mftune.models.llama import LlamaForCausalLM  # noqa: E402
from mftune.trainer.evaluate import eval_batches  # noqa: E402

EVAL_RECORDS = 21  # not a multiple of batch_size x data_parallel: the last step is partial


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("eval"))
    config = pp.make_workdir(d)
    ds = datasets.load_from_disk(os.path.join(d, "data")).select(range(EVAL_RECORDS))
    ds.save_to_disk(os.path.join(d, "eval"))
    # the same records cut to 20..60 tokens (first label ignored, as preprocessing does), packed
    lengths = [20 + (7 * i) % 41 for i in range(EVAL_RECORDS)]
    samples = datasets.Dataset.from_dict({
        "input_ids": [row[:n] for row, n in zip(ds["input_ids"], lengths)],
        "labels": [[-100] + row[1:n] for row, n in zip(ds["labels"], lengths)]})
    samples.save_to_disk(os.path.join(d, "samples"))
    pack_dataset(samples, pp.SEQ + 1, 0).save_to_disk(os.path.join(d, "eval-packed"))
    return d, config


def _reference(d: str, name: str = "eval") -> float:
    """exp(sum of next-token cross entropies over supervised positions / their number), each row alone."""
    model = LlamaForCausalLM(dict(pp.MODEL, compute_dtype="float32"))
    load_checkpoint(model, os.path.join(d, "base.safetensors"))
    ds = datasets.load_from_disk(os.path.join(d, name)).with_format("torch")
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids, labels = row["input_ids"][None, :-1].long(), row["labels"][None, 1:].long()
            logits = model(ids).float()
            mask = labels != -100
            total += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    return math.exp(total / count)


def test_eval_batches_cover_every_record_once(workdir):
    d, _ = workdir
    seen = []
    for rank in range(2):
        data = TrainData(os.path.join(d, "eval"), micro_batch_size=4, dp_rank=rank, dp_size=2, shuffle=False,
                         drop_remainder=False)
        for batch in eval_batches(data, -100):
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                if (labels != -100).any():
                    seen.append(ids.tolist())
    reference = datasets.load_from_disk(os.path.join(d, "eval"))["input_ids"]
    assert sorted(seen) == sorted(reference) and len(seen) == EVAL_RECORDS


def _eval(config: str, out: str, dp: int, mp: int, options: dict) -> dict:
    args = pp._args(config, "eval", out, dp, mp, options)
    if dp * mp == 1:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    else:
        r = subprocess.run(["bash", "scripts/launcher.sh", " ".join(args), str(dp * mp), str(pp.free_port()),
                            os.path.join(out, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    if dp * mp == 1:
        assert "Eval result: loss:" in r.stdout + r.stderr
    with open(os.path.join(out, "eval_results.json")) as f:
        return json.load(f)


def test_eval_perplexity_one_process_and_4_ranks(workdir):
    d, config = workdir
    expected = _reference(d)
    opts = {"eval_dataset.batch_size": 4}
    result = _eval(config, os.path.join(d, "eval-1"), 1, 1, dict(opts, eval_dataset_dir=os.path.join(d, "eval")))
    assert result["records"] == EVAL_RECORDS
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    # packed records: the same perplexity as every sample scored alone, on one process and on 4 ranks
    # (dp 2 x mp 2) with FSDP2, sequence parallel and the vocab-parallel loss; the packed records
    # do not fill a whole number of steps of 2 x 4, so the last step is partial
    expected = _reference(d, "samples")
    packed = dict(opts, eval_dataset_dir=os.path.join(d, "eval-packed"))
    n = datasets.load_from_disk(os.path.join(d, "eval-packed")).num_rows
    assert n % 8 and n < EVAL_RECORDS
    assert _eval(config, os.path.join(d, "eval-1p"), 1, 1, packed)["ppl"] == pytest.approx(expected, rel=1e-5)
    four = _eval(config, os.path.join(d, "eval-4p"), 2, 2, dict(pp.ALL_ON, **packed))
    assert four["ppl"] == pytest.approx(expected, rel=1e-5) and four["records"] == n


def test_do_eval_during_training_notes_the_best_step(workdir):
    d, config = workdir
    out = os.path.join(d, "train-eval")
    r = subprocess.run([sys.executable, *pp._args(config, "finetune", out, 1, 1, {
        "eval_dataset_dir": os.path.join(d, "eval"), "do_eval": True, "eval_step_interval": 2})],
        cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "eval_metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = min(evals, key=lambda e: e["loss"])
    with open(os.path.join(out, "checkpoint", "rank_0", "meta.json")) as f:
        meta = json.load(f)
    assert meta["best_eval"] == {"step": best["step"], "loss": best["loss"], "ppl": best["ppl"]}
    assert meta["last_step"] == pp.STEPS
    assert evals[-1]["loss"] < evals[0]["loss"]  # the adapters learn the task
