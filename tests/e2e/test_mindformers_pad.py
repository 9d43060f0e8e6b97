"""Pad tokens as MindFormers treats them, checked against MindFormers 1.3.2 itself (tests/mindformers_ref.py).

Reference: MindFormers' ``LlamaForCausalLM`` on the CPU (float32, no flash attention) holding the same weights
as mftune's model (written by this test as .npz under MindFormers' parameter names, which are mftune's). One
MindFormers subprocess computes, per case, its training loss (``set_train(True)``: ``net(input_ids, labels)``,
or ``net(input_ids)`` when the case has no labels), and for the scoring batch its eval logits and
``PerplexityMetric`` loss (``set_train(False)``). mftune's loss with ``mask_pad_token`` on (the default for
this config: pad 0 is neither bos nor eos) must equal MindFormers' within 1e-5; with it off (mftune's
behaviour before) the records with the pad id inside their input must differ, and right-padded records whose
padding is labelled -100 must not.
"""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from mftune import LlamaForCausalLM
from mftune.data.loader import TrainData
from mftune.trainer.evaluate import evaluate
from mindformers_ref import run_mindformers

MODEL = dict(seq_length=8, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, ignore_token_id=-100)
OURS = dict(MODEL, compute_dtype="float32", param_init_type="float32", rotary_dtype="float32",
            use_flash_attention=False, initializer_range=0.1)
X = -100  # ignore_token_id

# name -> (records of seq_length + 1 tokens, their labels or None: MindFormers then takes the inputs as labels)
CASES = {
    "pad_inside": ([[1, 5, 0, 7, 9, 0, 11, 12, 13], [1, 0, 0, 21, 22, 23, 0, 24, 2]],
                   [[X, 5, 0, 7, 9, 0, 11, 12, 13], [X, X, X, 21, 22, 23, 0, 24, 2]]),
    "pad_inside_no_labels": ([[1, 5, 0, 7, 9, 0, 11, 12, 13], [1, 0, 0, 21, 22, 23, 0, 24, 2]], None),
    "right_padded": ([[1, 5, 6, 7, 2, 0, 0, 0, 0], [1, 30, 31, 32, 33, 34, 2, 0, 0]],
                     [[X, X, 6, 7, 2, X, X, X, X], [X, X, X, 32, 33, 34, 2, X, X]]),
    "right_padded_pads_labelled": ([[1, 5, 6, 7, 2, 0, 0, 0, 0], [1, 30, 31, 32, 33, 34, 2, 0, 0]],
                                   [[X, 5, 6, 7, 2, 0, 0, 0, 0], [X, 30, 31, 32, 33, 34, 2, 0, 0]]),
    "all_pad_after_first": ([[1, 0, 0, 0, 0, 0, 0, 0, 0]], [[X, 0, 0, 0, 0, 0, 0, 0, 0]]),
}
CASES["batch"] = ([r for ids, labels in CASES.values() if labels is not None for r in ids],
                  [r for ids, labels in CASES.values() if labels is not None for r in labels])
# scored in eval mode: seq_length tokens per row (MindFormers' eval forward reads the whole row)
SCORED = [[1, 5, 0, 7, 9, 0, 11, 12], [1, 0, 0, 21, 22, 23, 0, 24], [1, 5, 6, 2, 0, 0, 0, 0]]

SCRIPT = '''
model_config, weights_file, cases_file, out_file = json.loads(sys.argv[1]), *sys.argv[2:]
net = build_llama(model_config, dict(np.load(weights_file)))
cases, result = json.load(open(cases_file)), {}
net.set_train(True)
for name, (ids, labels) in cases["train"].items():
    args = [Tensor(np.array(ids, np.int32))] + ([] if labels is None else [Tensor(np.array(labels, np.int32))])
    result[name] = float(net(*args).asnumpy().reshape(-1)[0])
net.set_train(False)
logits, tokens, input_mask = net(Tensor(np.array(cases["scored"], np.int32)))
from mindformers.core.metric import PerplexityMetric
metric = PerplexityMetric()
metric.clear()
metric.update(logits, tokens, input_mask)
result["eval_logits"] = logits.asnumpy().tolist()
result["eval_loss"] = metric.eval()["loss"]
json.dump(result, open(out_file, "w"))
'''


def _our_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(dict(OURS, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
                p.uniform_(0.5, 1.5)  # norms away from 1, so that a wrong norm would show
    return model


def _loss(model: LlamaForCausalLM, ids, labels) -> float:
    ids = torch.tensor(ids)
    with torch.no_grad():
        return float(model(ids, ids.clone() if labels is None else torch.tensor(labels)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """MindFormers' numbers for ``CASES`` and ``SCORED`` on ``_our_model()``'s weights."""
    d = tmp_path_factory.mktemp("mf_pad")
    np.savez(d / "weights.npz", **{k: v.numpy() for k, v in _our_model().state_dict().items()})
    (d / "cases.json").write_text(json.dumps({"train": CASES, "scored": SCORED}))
    run_mindformers(SCRIPT, json.dumps(MODEL), str(d / "weights.npz"), str(d / "cases.json"), str(d / "out.json"),
                    timeout=300)
    return json.loads((d / "out.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_training_loss_matches_mindformers(reference, case):
    """Expected: MindFormers' training loss of the case (its input mask hides pad keys, drops pad inputs)."""
    ids, labels = CASES[case]
    ours = _loss(_our_model(), ids, labels)
    assert abs(ours - reference[case]) < 1e-5, f"{case}: mftune {ours} vs MindFormers {reference[case]}"
    before = _loss(_our_model(mask_pad_token=False), ids, labels)  # labels only, all keys visible
    if case == "right_padded":  # padding labelled -100 and after every real token: the same either way
        assert abs(before - reference[case]) < 1e-5
    else:  # the test bites: the pad id inside the input, or pads as targets, changes the loss
        assert abs(before - reference[case]) > 1e-3, f"{case}: mask_pad_token False gives {before}"


def test_scoring_logits_match_mindformers_where_the_input_is_not_pad(reference):
    """Expected: MindFormers' eval logits (its eval forward hides pad keys too) at every non-pad position;
    what a pad position's logits are is left open (nothing reads them)."""
    ids = torch.tensor(SCORED)
    with torch.no_grad():
        ours = _our_model()(ids)
    theirs = torch.tensor(reference["eval_logits"]).reshape(ours.shape)
    real = ids != MODEL["pad_token_id"]
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_eval_of_input_only_records_matches_mindformers_perplexity(reference, tmp_path):
    """Expected: MindFormers' PerplexityMetric on its eval forward (pad keys hidden; every target but the pad
    id scored, also where the input is the pad id), through mftune's own eval path (TrainData, evaluate)."""
    datasets.Dataset.from_dict({"input_ids": SCORED}).save_to_disk(str(tmp_path / "eval"))
    data = TrainData(str(tmp_path / "eval"), micro_batch_size=len(SCORED), shuffle=False, drop_remainder=False)
    result = evaluate(_our_model(), data, device=torch.device("cpu"))
    assert abs(result["loss"] - reference["eval_loss"]) < 1e-5, (result, reference["eval_loss"])
