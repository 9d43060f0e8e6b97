"""LoRA (mftune.pet) against Hugging Face peft on transformers' Llama, plus MindFormers semantics.

Reference for numbers: transformers ``LlamaForCausalLM`` + ``peft.get_peft_model`` holding the same
base weights (copied through ``mftune.checkpoint.names``) and the same A/B values. MindFormers
semantics (matching, freezing, names, defaults) are from reference/mindformers.md §6.
"""
from __future__ import annotations

import logging
import math

import peft
import pytest
import torch
import transformers
from torch import nn

from mftune import LlamaConfig, LlamaForCausalLM
from mftune.checkpoint.names import hf_to_mftune, mftune_to_hf
from mftune.pet import (
    LoRALinear,
    LoraConfig,
    count_parameters,
    get_pet_model,
    init_lora_weights,
    lora_layers,
    lora_state_dict,
    merge_lora,
    pet_config_errors,
    trainable_summary,
    unmerge_lora,
)

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, seq_length=16,
            intermediate_size=96, compute_dtype="float32", param_init_type="float32", initializer_range=0.1)
ATTN = ".*wq|.*wk|.*wv|.*wo"  # lora_llama2_7b.yaml's target_modules
HF_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = "w1|w2|w3|wq|wk|wv|wo"
HF_ALL = HF_ATTN + ["gate_proj", "up_proj", "down_proj"]


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def hf_copy(model: LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """transformers Llama with the mftune base weights (LoRA A/B excluded), names via names.py."""
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False))
    base = {mftune_to_hf(k): v for k, v in model.state_dict().items() if "mindpet_delta" not in k}
    hf.load_state_dict(base, strict=True)
    return hf.eval()


def peft_twin(model: LlamaForCausalLM, targets: list[str], rank: int, alpha: float, use_rslora: bool = False,
              use_dora: bool = False, dropout: float = 0.0):
    """peft model on the same base weights, with every adapter's A/B copied from the mftune model.

    peft ``...self_attn.q_proj.lora_A.default.weight`` [r, in] <-> mftune ``...attention.wq.mindpet_delta_lora_a``.
    """
    ref = peft.get_peft_model(hf_copy(model), peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
        use_rslora=use_rslora, use_dora=use_dora))
    hf_layers = {n: m for n, m in ref.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = dict(lora_layers(model))
    assert {hf_to_mftune(n + ".weight")[: -len(".weight")] for n in hf_layers} == set(ours), "same layers wrapped"
    with torch.no_grad():
        for name, layer in hf_layers.items():
            mine = ours[hf_to_mftune(name + ".weight")[: -len(".weight")]]
            assert layer.scaling["default"] == mine.scaling
            layer.lora_A["default"].weight.copy_(mine.mindpet_delta_lora_a)
            layer.lora_B["default"].weight.copy_(mine.mindpet_delta_lora_b)
            if use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(mine.mindpet_delta_lora_magnitude)
    return ref.eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B is zero after init (the adapter is a no-op); make it non-zero so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.mindpet_delta_lora_a.copy_(torch.randn(layer.mindpet_delta_lora_a.shape, generator=g) * 0.1)
            layer.mindpet_delta_lora_b.copy_(torch.randn(layer.mindpet_delta_lora_b.shape, generator=g) * 0.1)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, TINY["seq_length"]), generator=torch.Generator().manual_seed(seed))


# (a) logits vs peft ----------------------------------------------------------------------------------

@pytest.mark.parametrize("target,hf_targets,rank,alpha,rslora", [
    (ATTN, HF_ATTN, 16, 16, False),  # lora_llama2_7b.yaml: scaling 1
    (ATTN, HF_ATTN, 4, 8, False),    # lora_llama2_13b.yaml's ratio: scaling 2
    (ALL, HF_ALL, 2, 3, False),      # every Linear of the block, scaling 1.5
    (ATTN, HF_ATTN, 16, 16, True),   # rsLoRA: scaling 16 / sqrt(16) = 4
])
def test_logits_match_peft(target, hf_targets, rank, alpha, rslora):
    """Expected: peft's logits on transformers' Llama with identical base and A/B (fp32, B random); peft_twin
    also checks each layer's scaling equals peft's."""
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target,
                              use_rslora=rslora))
    randomize_adapters(model)
    ref = peft_twin(model, hf_targets, rank, alpha, rslora)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x).logits
        base = ref.get_base_model()
        with ref.disable_adapter():
            base_logits = base(input_ids=x).logits
    assert (theirs - base_logits).abs().max() > 1e-2, "the adapters must change the logits for the test to bite"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# (b) merge / unmerge ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_unmerged_and_peft_merge(rslora):
    """Expected: unmerged logits (ours); merged W equals peft ``merge_and_unload`` W; unmerge restores W."""
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN, use_rslora=rslora))
    randomize_adapters(model)
    x = tokens()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ref_merged = peft_twin(model, HF_ATTN, 4, 8, rslora).merge_and_unload().state_dict()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        merge_lora(model)  # second merge is a no-op (warning), not a double add
        merged_again = model(x)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_again, merged, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        if "mindpet_delta" not in k:
            torch.testing.assert_close(v, ref_merged[mftune_to_hf(k)], rtol=1e-6, atol=1e-7)
    unmerge_lora(model)
    for k, v in model.state_dict().items():  # W + d - d: fp32 rounding only (|W| ~ 0.1 -> ulp ~ 1e-8)
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [16.0, None])
def test_lora_plus_steps_match_peft(ratio):
    """LoRA+ (pet_config lora_plus_lr_ratio): three AdamW steps of mftune's optimizer (B's groups at ratio x lr,
    set by the training loop's set_lr) and of peft's create_loraplus_optimizer on the twin model give the same
    A and B (fp32, 1e-5); plain LoRA (None) gives another B, so the comparison bites."""
    from peft.optimizers import create_loraplus_optimizer

    from mftune.config.schema import OptimizerConfig
    from mftune.trainer.optim import build_optimizer, set_lr

    model = tiny_model()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN,
                              lora_plus_lr_ratio=ratio))
    randomize_adapters(model)
    ref = peft_twin(model, HF_ATTN, 4, 8)
    cfg = OptimizerConfig(weight_decay=0.01, eps=1e-8)
    ours = build_optimizer(model, cfg, 0.0, ratio)
    theirs = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                       loraplus_weight_decay=0.01, eps=1e-8)
    x = tokens()
    for _ in range(3):
        set_lr(ours, 1e-3)
        for net, opt, logits in ((model, ours, lambda: model(x)), (ref, theirs, lambda: ref(input_ids=x).logits)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(logits()[:, :-1].reshape(-1, TINY["vocab_size"]),
                                              x[:, 1:].reshape(-1)).backward()
            opt.step()
    peft_layers = {hf_to_mftune(n + ".weight")[: -len(".weight")]: m for n, m in ref.base_model.model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    moved = 0.0
    for name, layer in lora_layers(model):
        b, peft_b = layer.mindpet_delta_lora_b.detach(), peft_layers[name].lora_B["default"].weight.detach()
        moved = max(moved, float((b - peft_b).abs().max()))
        if ratio:
            torch.testing.assert_close(b, peft_b, rtol=0, atol=1e-5)
            torch.testing.assert_close(layer.mindpet_delta_lora_a, peft_layers[name].lora_A["default"].weight,
                                       rtol=0, atol=1e-5)
    assert ratio or moved > 1e-3


def dora_model(dropout: float = 0.0, seed: int = 1) -> LlamaForCausalLM:
    """A DoRA model with random A and B and magnitudes off the row norms (so every term of the layer counts)."""
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=dropout, target_modules=ATTN, use_dora=True))
    randomize_adapters(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            assert torch.allclose(layer.mindpet_delta_lora_magnitude, layer.weight.norm(dim=1))  # B was 0: ||W||
            layer.mindpet_delta_lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))
    return model


def test_dora_logits_and_merge_match_peft():
    """use_dora: logits equal peft's (fp32, 1e-5) for the same W, A, B and magnitudes; merging gives peft's
    merge_and_unload weights and the same logits; unmerging restores W."""
    model = dora_model()
    ref = peft_twin(model, HF_ATTN, 4, 8, use_dora=True)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x).logits
        with ref.disable_adapter():
            plain = ref(input_ids=x).logits
    assert (theirs - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ref_merged = ref.merge_and_unload().state_dict()
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        if "mindpet_delta" not in k:
            torch.testing.assert_close(v, ref_merged[mftune_to_hf(k)], rtol=1e-6, atol=1e-6)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)


def test_dora_training_with_dropout_matches_peft_gradients():
    """Training mode with LoRA dropout (peft recomputes x W^T from the dropped input): the same dropout masks
    (same seed, same call order) give the same loss and the same gradients of A, B and the magnitude."""
    model = dora_model(dropout=0.2)
    ref = peft_twin(model, HF_ATTN, 4, 8, use_dora=True, dropout=0.2)
    model.train()
    ref.train()
    x = tokens()
    losses = []
    for net, call in ((model, lambda: model(x)), (ref, lambda: ref(input_ids=x).logits)):
        torch.manual_seed(7)
        logits = call()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY["vocab_size"]), x[:, 1:].reshape(-1))
        loss.backward()
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) < 1e-5
    peft_layers = {hf_to_mftune(n + ".weight")[: -len(".weight")]: m for n, m in ref.base_model.model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in lora_layers(model):
        theirs = peft_layers[name]
        for mine, other in ((layer.mindpet_delta_lora_a, theirs.lora_A["default"].weight),
                            (layer.mindpet_delta_lora_b, theirs.lora_B["default"].weight),
                            (layer.mindpet_delta_lora_magnitude, theirs.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-6)


def test_dora_fresh_layer_is_the_base_under_bf16_autocast():
    """The norm and m / norm are float32: a fresh DoRA model gives exactly the plain model's logits under bf16
    autocast (rounding m to bf16 moved them by ~0.4%)."""
    plain = tiny_model()
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN, use_dora=True))
    x = tokens()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), plain(x))


def test_dora_magnitudes_follow_the_weights_loaded_after_them(tmp_path):
    """The trainer's order: adapters initialised on empty memory, then the base loaded, then every magnitude a
    checkpoint did not provide set from the loaded weights (init_dora_magnitudes)."""
    from mftune.checkpoint.formats.single_file import save_complete
    from mftune.checkpoint.load import load_checkpoint, unique_state_dict
    from mftune.pet import init_dora_magnitudes, init_lora_weights

    base = tiny_model(seed=3)
    save_complete(str(tmp_path / "base.safetensors"), unique_state_dict(base), model_config=dict(TINY))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    get_pet_model(model, dict(lora_rank=4, target_modules=ATTN, use_dora=True))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # what empty memory may hold: every magnitude 0 after init_lora_weights
    init_lora_weights(model)
    report = load_checkpoint(model, str(tmp_path / "base.safetensors"))
    init_dora_magnitudes(model, report["loaded"])
    for _, layer in lora_layers(model):
        torch.testing.assert_close(layer.mindpet_delta_lora_magnitude, layer.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens()), base(tokens()), rtol=1e-5, atol=1e-5)


def test_dora_magnitude_is_trainable():
    """(Tensor parallel DoRA: tests/distributed/test_parallel.py.)"""
    model = dora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.attention.wq.mindpet_delta_lora_magnitude" in trainable


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_dora_norm_is_kept_between_no_grad_forwards_until_a_factor_changes(compute_dtype):
    """Decoding computes DoRA's row norm once; an in-place change of A (an optimizer step, a load) recomputes it,
    also when pet_config.compute_dtype makes the forward use copies. Expected: the freshly computed outputs."""
    model = dora_model().eval()
    for _, layer in lora_layers(model):
        layer.compute_dtype = None if compute_dtype is None else torch.bfloat16
    layer = lora_layers(model)[0][1]
    with torch.no_grad():
        first = model(tokens())
        assert "_norm_cache" in layer.__dict__
        layer.mindpet_delta_lora_a.mul_(1.5)
        changed = model(tokens())
        layer.__dict__.pop("_norm_cache")
        fresh = model(tokens())
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)


def test_modules_to_save_train_whole_modules():
    """pet_config modules_to_save (PEFT's rule: a module named so, or ending with .<name>): its parameters train
    with the adapters; a name of no module, or a tied lm_head, is refused naming the key."""
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, target_modules=ATTN, modules_to_save=["lm_head", "norm_out"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "model.norm_out.weight"} <= trainable
    assert not any("tok_embeddings" in n or "attention_norm" in n for n in trainable)
    with pytest.raises(ValueError, match=r"modules_to_save=\['wq'\] is invalid: model.layers.0.attention.wq holds"):
        get_pet_model(tiny_model(), dict(lora_rank=4, target_modules=ATTN, modules_to_save=["wq"]))
    with pytest.raises(ValueError, match="modules_to_save=\\['lmhead'\\] is invalid: 'lmhead' names no module"):
        get_pet_model(tiny_model(), dict(lora_rank=4, target_modules=ATTN, modules_to_save=["lmhead"]))
    tied = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="with tie_word_embeddings"):
        get_pet_model(tied, dict(lora_rank=4, target_modules=ATTN, modules_to_save=["lm_head"]))


# (c) parameter counts and the summary line --------------------------------------------------------

def test_trainable_counts_and_summary_match_peft(capsys):
    """Expected: peft ``get_nb_trainable_parameters()`` and the text of ``print_trainable_parameters()``."""
    model = tiny_model()
    get_pet_model(model, dict(lora_rank=8, lora_alpha=16, target_modules=ATTN))
    ref = peft_twin(model, HF_ATTN, 8, 16)
    assert count_parameters(model) == ref.get_nb_trainable_parameters()
    ref.print_trainable_parameters()
    assert trainable_summary(model) == capsys.readouterr().out.strip()


# (d) gradients reach A/B only ----------------------------------------------------------------------

def test_only_adapters_get_gradients():
    """Expected (MindPet freeze_delta 'lora'): every parameter frozen except *mindpet_delta_lora*."""
    model = tiny_model().train()
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN))
    randomize_adapters(model)
    x = tokens()
    model(x, labels=x).backward()
    for name, p in model.named_parameters():
        if "mindpet_delta_lora" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert not model.model.tok_embeddings.embedding_weight.requires_grad
    assert not model.model.layers[0].attention_norm.weight.requires_grad
    assert not model.model.norm_out.weight.requires_grad


# (e) the 7B arithmetic on meta ---------------------------------------------------------------------

def test_7b_trainable_count_on_meta(caplog):
    """Expected: 32 layers x 4 targets x 2 matrices x 16 x 4096 = 16,777,216 (reference/mindformers.md §6.5);
    all = 6,738,415,616 (Llama-2-7b) + 16,777,216; the line is PEFT's format."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())  # defaults are Llama2-7B
    with caplog.at_level(logging.INFO, logger="mftune"):
        get_pet_model(model, dict(pet_type="lora", lora_rank=16, lora_alpha=16, lora_dropout=0.05, target_modules=ATTN))
    assert 32 * 4 * 2 * 16 * 4096 == 16_777_216
    assert count_parameters(model) == (16_777_216, 6_738_415_616 + 16_777_216)
    line = "trainable params: 16,777,216 || all params: 6,755,192,832 || trainable%: 0.2484"
    assert trainable_summary(model) == line
    assert line in caplog.text and "replaced 128 Linear layers" in caplog.text
    assert all(p.is_meta for p in lora_state_dict(model).values())


def test_meta_build_to_empty_then_init():
    """Build on meta, apply LoRA, ``to_empty``: model.init_weights() and init_lora_weights give B = 0, A in
    kaiming-uniform(a=sqrt(5)) bounds (1/sqrt(in), PEFT/torch Linear default), base weights re-drawn."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    get_pet_model(model, dict(lora_rank=4, target_modules=ATTN))
    model.to_empty(device="cpu")
    model.init_weights()
    for _, layer in lora_layers(model):
        assert torch.all(layer.mindpet_delta_lora_b == 0)
        assert layer.mindpet_delta_lora_a.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert torch.isfinite(layer.weight).all() and 0.05 < layer.weight.std() < 0.2  # N(0, initializer_range)
        layer.mindpet_delta_lora_b.data.fill_(1.0)
    init_lora_weights(model)
    assert all(torch.all(layer.mindpet_delta_lora_b == 0) for _, layer in lora_layers(model))
    assert torch.isfinite(model(tokens())).all()


# (f) MindFormers target matching and freezing -------------------------------------------------------

def wrapped(model: nn.Module) -> list[str]:
    return [n for n, _ in lora_layers(model)]


def test_target_regex_hits_only_named_layers():
    """``.*wq|.*wv`` (lora_llama2_13b.yaml) hits wq and wv in every layer and nothing else."""
    model = tiny_model()
    get_pet_model(model, dict(target_modules=".*wq|.*wv"))
    assert wrapped(model) == [f"model.layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")]
    assert isinstance(model.model.layers[0].attention.wk, nn.Linear)


def test_names_and_weight_reuse():
    """The base weight keeps its name and Parameter object; A/B are [r, in] / [out, r] (§6.4, §6.6)."""
    model = tiny_model()
    wq = model.model.layers[0].attention.wq
    base_keys = set(model.state_dict())
    get_pet_model(model, dict(lora_rank=4, target_modules=".*wq"))
    layer = model.model.layers[0].attention.wq
    assert isinstance(layer, LoRALinear) and layer.weight is wq.weight
    assert (layer.in_features, layer.out_features) == (wq.in_features, wq.out_features)
    adapters = {f"model.layers.{i}.attention.wq.mindpet_delta_lora_{ab}" for i in range(2) for ab in "ab"}
    assert set(model.state_dict()) == base_keys | adapters
    assert set(lora_state_dict(model)) == adapters
    assert lora_state_dict(model)["model.layers.0.attention.wq.mindpet_delta_lora_a"].shape == (4, 64)
    assert lora_state_dict(model)["model.layers.0.attention.wq.mindpet_delta_lora_b"].shape == (64, 4)


def test_exclude_layers_and_lm_head():
    """exclude_layers is re.match'ed against local names: '1' skips the whole layer ``layers.1``.
    lm_head is outside the backbone ``model`` (MindFormers never wraps it): mftune wraps it only when a pattern
    names it (the issue's extension, as PEFT allows), never for a broad pattern such as '.*head'."""
    model = tiny_model()
    get_pet_model(model, dict(target_modules=".*wq|.*lm_head", exclude_layers=["1"]))
    assert wrapped(model) == ["model.layers.0.attention.wq", "lm_head"]
    model = tiny_model()
    get_pet_model(model, dict(target_modules=".*wq|.*head", exclude_layers=["1"]))
    assert wrapped(model) == ["model.layers.0.attention.wq"]
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="target_modules=.*lm_head.* is invalid with tie_word_embeddings"):
        get_pet_model(LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True})),
                      dict(target_modules=".*wq|lm_head"))
    model = tiny_model()
    get_pet_model(model, dict(target_modules=ATTN, exclude_layers=["wk", "wo"]))
    assert wrapped(model) == [f"model.layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")]


@pytest.mark.parametrize("target", ["q_proj", ".*", "attention", ".*wq"])
def test_zero_matches_is_a_clear_error(target):
    """MindFormers semantics: a name that matches but is not a Linear is skipped and not recursed into,
    so ``.*`` (matches 'layers') and ``attention`` match nothing; mftune raises instead of training nothing."""
    exclude = ["wq"] if target == ".*wq" else None
    with pytest.raises(ValueError) as e:
        get_pet_model(tiny_model(), dict(target_modules=target, exclude_layers=exclude))
    msg = str(e.value)
    assert repr(target) in msg and "matched no nn.Linear" in msg
    assert "w1, w2, w3, wk, wo, wq, wv" in msg  # the local Linear names that exist


def test_freeze_include_exclude():
    """MindPet freeze_delta: after the LoRA freeze, freeze_include freezes, freeze_exclude unfreezes,
    and a parameter matching both lists is left as it is."""
    model = tiny_model()
    get_pet_model(model, dict(target_modules=ATTN, freeze_include=["*layers.0.*", "*norm_out*"],
                              freeze_exclude=["*norm*", "*layers.0.attention.wq.*"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.attention.wk.mindpet_delta_lora_a" not in trainable  # include only -> frozen
    assert "model.layers.1.attention_norm.weight" in trainable  # exclude only -> unfrozen
    assert "model.layers.0.attention.wq.mindpet_delta_lora_a" in trainable  # both -> untouched (was trainable)
    assert "model.layers.0.attention.wq.weight" not in trainable  # both -> untouched (was frozen)
    assert "model.norm_out.weight" not in trainable  # both -> untouched (was frozen)
    assert "model.layers.1.attention.wk.mindpet_delta_lora_b" in trainable


def test_apply_twice_and_unsupported_type():
    model = tiny_model()
    get_pet_model(model, dict(target_modules=ATTN))
    with pytest.raises(ValueError, match="already applied"):
        get_pet_model(model, dict(target_modules=ATTN))
    with pytest.raises(ValueError, match="'adapter' is not supported yet"):
        get_pet_model(tiny_model(), dict(pet_type="adapter"))


# (g) dropout --------------------------------------------------------------------------------------

def test_dropout_only_on_lora_branch():
    """MindPet/PEFT: y = x W^T + dropout(x) A^T B^T * s. With B = 0 the train-mode output is exactly the
    base output; with B random it is the base plus the branch on the same dropout mask; eval is deterministic."""
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0
    nn.init.normal_(layer.mindpet_delta_lora_b)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    h = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + h @ layer.mindpet_delta_lora_a.T @ layer.mindpet_delta_lora_b.T * 2.0
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    no_dropout = base(x) + x @ layer.mindpet_delta_lora_a.T @ layer.mindpet_delta_lora_b.T * 2.0
    torch.testing.assert_close(layer(x), no_dropout, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_param_and_compute_dtype():
    """param_init_type sets the A/B dtype (None inherits the base); compute_dtype casts the layer's math."""
    base = nn.Linear(16, 8, bias=False, dtype=torch.bfloat16)
    assert LoRALinear(base, 2, 4).mindpet_delta_lora_a.dtype == torch.bfloat16
    layer = LoRALinear(base, 2, 4, param_init_type=torch.float32)
    nn.init.normal_(layer.mindpet_delta_lora_b)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert layer.mindpet_delta_lora_b.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    layer32 = LoRALinear(nn.Linear(16, 8), 2, 4, compute_dtype=torch.bfloat16)
    assert layer32(torch.randn(4, 16)).dtype == torch.float32


def test_bf16_autocast_model_trains_fp32_adapters():
    """7B-style run: bf16 params and compute (autocast), adapters in param_init_type float32 (MindPet 7B)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "compute_dtype": "bfloat16", "param_init_type": "bfloat16"}))
    get_pet_model(model, dict(target_modules=ATTN, param_init_type="float32", lora_dropout=0.05))
    randomize_adapters(model)
    x = tokens()
    loss = model(x, labels=x)
    loss.backward()
    assert torch.isfinite(loss)
    for _, layer in lora_layers(model):
        assert layer.weight.dtype == torch.bfloat16 and layer.mindpet_delta_lora_b.grad.dtype == torch.float32


# (h) config validation and the zero init ----------------------------------------------------------

def test_pet_config_errors_reports_everything():
    """Every problem at once, ``<prefix>.<key>=<value> is invalid: <why>. <fix>`` with the closest key."""
    errors = pet_config_errors(dict(lora_rnak=16, lora_rank=0, lora_alpha=0, lora_dropout=1.0,
                                    target_modules="(wq", param_init_type="bf32"))
    text = "\n".join(errors)
    assert len(errors) == 6, text
    assert "model.model_config.pet_config.lora_rnak=16 is invalid" in text and "Did you mean 'lora_rank'?" in text
    assert "model.model_config.pet_config.lora_rank=0 is invalid: the LoRA rank must be a positive integer" in text
    assert "lora_alpha=0 is invalid" in text and "lora_dropout=1.0 is invalid" in text
    assert "target_modules='(wq' is invalid" in text and "param_init_type='bf32' is invalid" in text
    missing = pet_config_errors({"lora_rank": 2.5}, key_prefix="pet")
    assert missing[0].startswith("pet.lora_rank=2.5 is invalid") and missing[1].startswith("pet.target_modules=None")
    assert pet_config_errors(dict(pet_type="lora", lora_rank=16, lora_alpha=16, lora_dropout=0.05,
                                  lora_a_init="normal", lora_b_init="zero", target_modules=ATTN)) == []
    with pytest.raises(ValueError, match="lora_rnak"):
        LoraConfig.from_dict(dict(lora_rnak=16, target_modules=ATTN))
    cfg = LoraConfig.from_dict(dict(target_modules=ATTN))  # defaults: MindFormers LoraConfig
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.param_init_type) == (8, 16, 0.01, None)


def test_fresh_lora_model_equals_base():
    """B is initialised to zero (MindPet LoRADense default, PEFT init_lora_weights=True): a fresh LoRA
    model gives exactly the base logits, also in train mode with dropout."""
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        before = model(x)
        get_pet_model(model, dict(lora_rank=8, lora_alpha=16, lora_dropout=0.3, target_modules=ALL))
        assert all(torch.all(layer.mindpet_delta_lora_b == 0) for _, layer in lora_layers(model))
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        torch.testing.assert_close(model.train()(x), before, rtol=0, atol=0)
