"""recompute_config as MindFormers' LayerSetting reads it: which layers, which sub-module operators;
selective recompute keeps the gradients and stores less."""
import pytest
import torch

from mftune.models.llama import LlamaForCausalLM
from mftune.parallel.recompute import LayerRecompute, apply_recompute, plan, stage_sizes

TINY = {"seq_length": 16, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "vocab_size": 50,
        "multiple_of": 16, "compute_dtype": "float32", "rotary_dtype": "float32"}
FFN = {"feed_forward": {"mul", "silu"}}  # MindFormers' default select patterns


def test_select_recompute_true_is_the_default_ffn_patterns_on_every_layer():
    assert plan(False, True, False, 4) == [LayerRecompute(False, FFN)] * 4
    assert not any(plan(False, False, False, 4))


def test_counts_per_stage_pick_the_first_layers_of_each_stage():
    # 8 layers in 4 stages of 2: [2, 1, 0, 0] -> layers 0, 1 (stage 0) and 2 (stage 1)
    layers = plan(False, [2, 1, 0, 0], False, 8)
    assert [i for i, w in enumerate(layers) if w] == [0, 1, 2]
    # full recompute wins over select for its layers (MindFormers: full, else select)
    layers = plan([1, 1], True, False, 4)
    assert [w.full for w in layers] == [True, False, True, False]
    assert [w.select for w in layers] == [FFN, FFN, FFN, FFN]  # kept, unused where full
    assert "full recompute of 2 decoder layer(s) (layers 0, 2); selective recompute of feed_forward.mul, " \
           "feed_forward.silu in 2 layer(s) (layers 1, 3)" == apply_recompute(LlamaForCausalLM(TINY).model.layers,
                                                                             layers)
    assert stage_sizes(10, 4) == [2, 2, 2, 4] and stage_sizes(10, 4, [1, 1, 0, 0]) == [3, 3, 2, 2]


def test_pattern_dict_and_exclude():
    select = {r"feed_forward\.mul": [1, 0], r"attention\..*softmax": True, r"ffn_norm": [0, 2]}
    layers = plan(False, select, {r"attention\.softmax": [0, 1]}, 4)
    assert layers[0].select == {"feed_forward": {"mul"}, "attention": {"softmax"}}
    assert layers[1].select == {"attention": {"softmax"}}
    assert layers[2].select == {"ffn_norm": None}  # a pattern naming a module: all of it; softmax excluded
    assert layers[3].select == {"attention": {"softmax"}, "ffn_norm": None}


def test_unknown_pattern_warns_and_recomputes_nothing(caplog):
    """As in MindFormers: a pattern naming no module and no operator (a typo, unescaped dots) matches nothing."""
    for pattern in (r"mlp\.mul", r"feed_forward\.mull", "feed_forward.mul"):
        assert not any(plan(False, {pattern: True}, False, 2)), pattern
    assert caplog.text.count("recomputes nothing") == 3
    assert plan(False, {r"feed_forward\.w1": True}, False, 1)[0].select == {"feed_forward": None}  # a module


def test_stage_counts_include_exclude_lists_and_int_offsets():
    layers = plan(False, True, [0, 1, 0], 6)  # 3 stages of 2 from the exclude list: layer 2 excluded
    assert [bool(w) for w in layers] == [True, True, False, True, True, True]
    assert stage_sizes(9, 3, 0) == [3, 3, 3] and stage_sizes(9, 2, [1, 0]) == [5, 4]


def _run(layer_plan):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    if layer_plan is not None:
        apply_recompute(model.model.layers, layer_plan)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("select", [True, {r"attention": True}, {r"feed_forward\.w.*": True}])
def test_selective_recompute_same_gradients_less_saved(select):
    plain, plain_bytes = _run(None)
    grads, selected_bytes = _run(plan(False, select, False, 4))
    assert selected_bytes < plain_bytes
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=0)
