"""Pad tokens as MindFormers treats them (``model_config.mask_pad_token``).

Reference for the numbers: transformers' ``LlamaForCausalLM`` holding the same weights (tests/tiny_hf.py),
given ``attention_mask = (input != pad)``, which hides those keys from every query, as MindFormers' mask
from ``pad_token_id`` does; the cross-entropy is summed here by hand over the positions MindFormers'
training loss keeps (input not the pad id, label not ignored). MindFormers itself, on the same cases:
tests/e2e/test_mindformers_pad.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tiny_hf
from mftune.checkpoint.names import hf_config_to_model_config
from mftune.config.schema import RunnerWrapperConfig
from mftune.models.attention import pad_keys_visible
from mftune.models.config import LlamaConfig
from mftune.models.llama import pad_mask_id
from mftune.parallel.mesh import ParallelContext
from mftune.trainer.evaluate import score_batch
from mftune.trainer.loop import LoopSettings, TrainRun, _token_counts, train_step
from mftune.trainer.optim import LossScaler

X = -100  # ignore_token_id
PAD = 0  # tiny_hf's pad_token_id (bos 1, eos 2)
IDS = torch.tensor([[1, 5, 0, 7, 9, 0, 11, 12, 13], [1, 0, 0, 21, 22, 23, 0, 24, 2]])
LABELS = torch.tensor([[X, 5, 0, 7, 9, 0, 11, 12, 13], [X, X, X, 21, 22, 23, 0, 24, 2]])


@pytest.fixture(scope="module")
def hf():
    return tiny_hf.hf_model()


def _ours(hf, **overrides):
    return tiny_hf.mftune_from_hf(hf, **overrides)


@torch.no_grad()
def _hand_loss(hf, ids: torch.Tensor, labels: torch.Tensor, hide_pad: bool, drop_pad_inputs: bool = True) -> float:
    """Mean next-token cross-entropy of transformers' logits: with ``hide_pad`` pad keys hidden and (with
    ``drop_pad_inputs``) positions whose input is the pad id dropped; else today's label-only loss."""
    inputs, targets = ids[:, :-1], labels[:, 1:]
    keep = inputs != PAD
    logits = hf(input_ids=inputs, attention_mask=keep.long() if hide_pad else None).logits
    scored = (targets != X) & (keep if hide_pad and drop_pad_inputs else torch.ones_like(keep))
    return float(F.cross_entropy(logits[scored], targets[scored]))


def test_loss_hides_pad_keys_and_drops_pad_inputs(hf):
    """Expected: transformers' logits with the pad keys masked, CE over inputs != pad and labels != -100."""
    expected = _hand_loss(hf, IDS, LABELS, hide_pad=True)
    assert abs(expected - _hand_loss(hf, IDS, LABELS, hide_pad=False)) > 1e-3  # the cases bite
    model = _ours(hf, mask_pad_token=True)
    with torch.no_grad():
        assert float(model(IDS, LABELS)) == pytest.approx(expected, abs=1e-5)
        loss_sum, tokens = model(IDS, LABELS, reduction="sum")
    assert int(tokens) == 10  # 14 labelled targets, 4 of them after a pad input


def test_rule_off_is_the_label_only_loss(hf):
    """Expected: transformers without an attention mask, CE over labels != -100 (mftune before the rule)."""
    expected = _hand_loss(hf, IDS, LABELS, hide_pad=False)
    with torch.no_grad():
        assert float(_ours(hf, mask_pad_token=False)(IDS, LABELS)) == pytest.approx(expected, abs=1e-5)
        assert float(_ours(hf)(IDS, LABELS)) == pytest.approx(expected, abs=1e-5)  # an HF config.json: off


def test_pad_equal_to_eos_keeps_eos(hf):
    """A Hugging Face style pad == eos: every eos stays a visible, trained-on token (rule resolves off)."""
    ids = torch.tensor([[1, 5, 6, 2, 7, 8, 2, 9, 2, 2, 2]])  # two turns ending in eos, then eos padding
    labels = torch.tensor([[X, X, 6, 2, X, 8, 2, X, 2, X, X]])
    model = _ours(hf, pad_token_id=2, mask_pad_token=None)
    assert model.pad_mask_id is None
    with torch.no_grad():
        assert float(model(ids, labels)) == pytest.approx(_hand_loss(hf, ids, labels, hide_pad=False), abs=1e-5)
        assert int(model(ids, labels, reduction="sum")[1]) == 5  # the three eos targets included


@pytest.mark.parametrize("overrides, expected", [
    ({}, 0),  # MindFormers' Llama2: pad 0 (<unk>), bos 1, eos 2
    ({"pad_token_id": 2}, None),  # pad is eos
    ({"pad_token_id": 1}, None),  # pad is bos
    ({"pad_token_id": 9, "eos_token_id": [2, 9]}, None),  # pad is one of several eos (Llama 3.1 style)
    ({"pad_token_id": 128002, "bos_token_id": 128000, "eos_token_id": 128001}, 128002),  # MindFormers' Llama 3
    ({"pad_token_id": 2, "mask_pad_token": True}, 2),  # explicit wins
    ({"mask_pad_token": False}, None),
])
def test_pad_mask_id_resolution(overrides, expected):
    assert pad_mask_id(LlamaConfig(**overrides)) == expected


def test_hf_config_json_means_hf_semantics(hf):
    assert hf_config_to_model_config(hf.config.to_dict())["mask_pad_token"] is False


def test_right_padding_keeps_the_causal_kernel(hf):
    """No pad before a real token: no mask is built (SDPA's is_causal), and the loss is still the rule's."""
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0, 0], [1, 30, 31, 32, 33, 34, 2, 0, 0]])
    labels = ids.clone()
    labels[:, 0] = X  # pads are labelled: the rule drops the pad inputs' targets, keeps eos -> pad
    model = _ours(hf, mask_pad_token=True)
    assert not pad_keys_visible(ids[:, :-1], PAD) and pad_keys_visible(IDS[:, :-1], PAD)
    assert model.model._mask(ids[:, :-1], None, None, None, False, PAD) is None
    with torch.no_grad():
        assert float(model(ids, labels)) == pytest.approx(_hand_loss(hf, ids, labels, hide_pad=True), abs=1e-5)


def test_packed_sample_with_pad_inside_equals_it_alone(hf):
    """Expected: each sample's summed loss on its own (rule on); the packed row needs the SDPA mask."""
    s1, l1 = [1, 5, 0, 7, 9], [X, 5, 0, 7, 9]
    s2, l2 = [1, 20, 21, 0, 22, 2], [X, 20, 21, 0, 22, 2]
    row, labels = s1 + s2 + [0, 0, 0], l1 + l2 + [X, X, X]  # the padding tail is a sample of its own
    positions = torch.tensor([list(range(5)) + list(range(6)) + list(range(3))])
    model = _ours(hf, mask_pad_token=True)
    with torch.no_grad():
        packed, n = model(torch.tensor([row]), torch.tensor([labels]), reduction="sum", positions=positions,
                          packed=True)
        alone = [model(torch.tensor([s]), torch.tensor([lab]), reduction="sum") for s, lab in ((s1, l1), (s2, l2))]
    assert float(packed) == pytest.approx(sum(float(a) for a, _ in alone), abs=1e-5)
    assert int(n) == sum(int(c) for _, c in alone) == 7


def test_leading_pads_stay_finite(hf):
    """A row that starts with pads: those queries see only themselves, never an all-masked (NaN) row."""
    ids = torch.tensor([[0, 0, 0, 1, 5, 6, 7, 2]])
    labels = torch.tensor([[X, X, X, X, 5, 6, 7, 2]])
    model = _ours(hf, mask_pad_token=True).train()
    loss = model(ids, labels)
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_decoding_ignores_the_rule(hf):
    """With an attention_mask (generation), pad ids inside the prompt are what the mask says, rule or not."""
    ids, keep = IDS[:, :-1], torch.ones_like(IDS[:, :-1])
    with torch.no_grad():
        on = _ours(hf, mask_pad_token=True)(ids, attention_mask=keep)
        off = _ours(hf, mask_pad_token=False)(ids, attention_mask=keep)
    torch.testing.assert_close(on, off, rtol=0, atol=0)


def test_trainer_averages_over_the_rules_targets(hf):
    """train_step's loss is the model's mean loss (its denominator counts loss_targets, not labels)."""
    model = _ours(hf, mask_pad_token=True).train()
    run = TrainRun(model, torch.optim.SGD(model.parameters(), lr=0.0), LossScaler(RunnerWrapperConfig()),
                   schedule=None, data=None, monitor=None, ctx=ParallelContext())
    batch = {"input_ids": IDS, "labels": LABELS}
    assert _token_counts(model, [batch], ParallelContext()).tolist() == [10.0, 11.0]
    settings = LoopSettings(epochs=1, save_checkpoint_steps=None, eval_step_interval=-1, eval_epoch_interval=-1,
                            max_grad_norm=math.inf)
    stats = train_step(run, settings, [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}],
                       lr=0.0)
    assert stats["loss"] == pytest.approx(_hand_loss(hf, IDS, LABELS, hide_pad=True), abs=1e-5)


def test_scoring_keeps_targets_after_a_pad_input(hf):
    """Eval (MindFormers' PerplexityMetric): pad keys hidden, every labelled target scored, also those whose
    input is the pad id. Expected: transformers' logits with the pad keys masked, CE over labels != -100."""
    expected = _hand_loss(hf, IDS, LABELS, hide_pad=True, drop_pad_inputs=False)
    with torch.no_grad():
        loss_sum, tokens = score_batch(_ours(hf, mask_pad_token=True), {"input_ids": IDS, "labels": LABELS},
                                       torch.device("cpu"))
    assert int(tokens) == 14 and float(loss_sum) / 14 == pytest.approx(expected, abs=1e-5)
