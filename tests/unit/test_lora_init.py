"""init_lora_weights: gaussian, PiSSA and OLoRA against peft's own initialisations (tests/tiny_hf.py's model, GQA).

mftune keeps the base weight and subtracts ``s B0 A0`` (mftune/pet/init.py); peft replaces the weight by that
residual. Expected values: peft's A and B after its init on the same weights, and peft's logits when both models
then hold the same (random) A and B, within 1e-5 in float32.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import tiny_hf
from mftune.pet import get_pet_model, init_from_weights, lora_layers, merge_lora, unmerge_lora

TARGETS = ".*wq|.*wk|.*wv|.*wo|.*w2"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
IDS = torch.randint(1, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))


def _pair(init: str, rank: int = 4, alpha: float = 8, rslora: bool = False):
    hf = tiny_hf.hf_model()
    ours = tiny_hf.mftune_from_hf(hf)
    get_pet_model(ours, dict(lora_rank=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                             init_lora_weights=init, use_rslora=rslora))
    init_from_weights(ours)
    theirs = get_peft_model(copy.deepcopy(hf), PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS,
                                                              init_lora_weights=init, use_rslora=rslora)).eval()
    return hf, ours.eval(), theirs


def _peft_layer(theirs, name: str):
    """peft's LoRA layer for mftune's ``model.layers.0.attention.wq``."""
    hf_name = (name.replace("attention.wq", "self_attn.q_proj").replace("attention.wk", "self_attn.k_proj")
               .replace("attention.wv", "self_attn.v_proj").replace("attention.wo", "self_attn.o_proj")
               .replace("feed_forward.w2", "mlp.down_proj"))
    return theirs.base_model.model.get_submodule(hf_name)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_base_inits_equal_peft(init, rslora):
    """Expected: peft's A and B (PiSSA: its SVD factors; OLoRA: its QR factors), peft's logits at init (= the base
    model's) and after both get the same random A and B; merge and unmerge keep mftune's logits."""
    hf, ours, theirs = _pair(init, rslora=rslora)
    for name, layer in lora_layers(ours):
        peft_layer = _peft_layer(theirs, name)
        torch.testing.assert_close(layer.mindpet_delta_lora_a, peft_layer.lora_A["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.mindpet_delta_lora_b, peft_layer.lora_B["default"].weight, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = hf(input_ids=IDS).logits
        torch.testing.assert_close(ours(IDS), base, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(input_ids=IDS).logits, base, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = _peft_layer(theirs, name)
            for ours_p, peft_p in ((layer.mindpet_delta_lora_a, peft_layer.lora_A["default"].weight),
                                   (layer.mindpet_delta_lora_b, peft_layer.lora_B["default"].weight)):
                ours_p.add_(torch.randn(ours_p.shape, generator=g) * 0.05)
                peft_p.copy_(ours_p)
        got, want = ours(IDS), theirs(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the adapters changed the model: the comparison bites
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(ours)(IDS), got, rtol=0, atol=1e-5)
        torch.testing.assert_close(unmerge_lora(ours)(IDS), got, rtol=0, atol=1e-5)


def test_init_factors_are_frozen_and_the_base_is_kept():
    """Expected: the base weight is the loaded one (its checkpoint and fingerprint stay valid); A0 and B0 are frozen
    and derived again from the weight, so a checkpoint's trained A and B are kept (keep_adapters); a model built
    with its weights (the API) gets them at once; a trainable adapted weight (freeze_exclude) is refused, and
    freeze_exclude cannot make A0 / B0 train."""
    hf = tiny_hf.hf_model()
    direct = tiny_hf.mftune_from_hf(hf)
    get_pet_model(direct, dict(lora_rank=4, lora_alpha=8, target_modules=".*wq", init_lora_weights="olora"))
    assert all(layer.mindpet_delta_init_a.any() for _, layer in lora_layers(direct))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is invalid with model.layers.0.attention.wq.weight "
                                         "trainable"):
        get_pet_model(tiny_hf.mftune_from_hf(hf), dict(target_modules=".*wq", init_lora_weights="pissa",
                                                       freeze_exclude=["*wq*"]))
    model = tiny_hf.mftune_from_hf(hf)
    get_pet_model(model, dict(target_modules=".*wq", init_lora_weights="pissa", freeze_exclude=["*init_a"]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "init_" in n)
    hf, ours, _ = _pair("pissa")
    name, layer = lora_layers(ours)[0]
    torch.testing.assert_close(layer.weight, hf.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    assert not layer.mindpet_delta_init_a.requires_grad and not layer.mindpet_delta_init_b.requires_grad
    assert layer.mindpet_delta_lora_a.requires_grad and layer.mindpet_delta_lora_b.requires_grad
    with torch.no_grad():
        layer.mindpet_delta_lora_a.mul_(2)
    trained = layer.mindpet_delta_lora_a.clone()
    init_from_weights(ours, [f"{name}.mindpet_delta_lora_a", f"{name}.mindpet_delta_lora_b"])
    assert torch.equal(layer.mindpet_delta_lora_a, trained)
    torch.testing.assert_close(layer.mindpet_delta_init_a, trained / 2)


def test_gaussian_and_pissa_niter():
    """gaussian: A ~ N(0, 1/r) as peft draws it, B = 0. pissa_niter_4: a randomised SVD from a fixed seed (the same
    factors on every call), which leaves a residual almost as small as the full SVD's best rank-r part."""
    _, ours, _ = _pair("gaussian", rank=8)
    a = torch.cat([layer.mindpet_delta_lora_a.flatten() for _, layer in lora_layers(ours)])
    assert abs(a.std().item() - 1 / 8) < 0.01 and all(not layer.mindpet_delta_lora_b.any()
                                                         for _, layer in lora_layers(ours))
    _, exact, _ = _pair("pissa")
    _, fast, _ = _pair("pissa_niter_4")
    _, again, _ = _pair("pissa_niter_4")
    for (_, e), (_, f), (_, g) in zip(lora_layers(exact), lora_layers(fast), lora_layers(again)):
        assert torch.equal(f.mindpet_delta_lora_a, g.mindpet_delta_lora_a)
        residual = [torch.linalg.norm(x.weight - x.scaling * x.mindpet_delta_lora_b @ x.mindpet_delta_lora_a)
                    for x in (e, f)]
        assert residual[0] <= residual[1] <= 1.05 * residual[0], residual


def test_unsupported_values_are_refused():
    from mftune.pet import pet_config_errors

    errors = pet_config_errors(dict(target_modules=TARGETS, init_lora_weights="loftq"))
    assert len(errors) == 1 and "init_lora_weights='loftq' is invalid: must be true, gaussian, pissa" in errors[0]
    errors = pet_config_errors(dict(target_modules=TARGETS, init_lora_weights=False))
    assert "false leaves B random" in errors[0]
    errors = pet_config_errors(dict(target_modules=TARGETS, init_lora_weights="pissa", use_dora=True))
    assert "pissa with use_dora is not supported" in errors[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_and_merge_are_over_the_original_base(init, tmp_path):
    """A PiSSA / OLoRA checkpoint (trained A and B, the base recorded): exported, peft loads the plain rank-2r adapter
    (r and lora_alpha doubled, init_lora_weights true) over the original base and gives mftune's logits;
    transform_ckpt_lora's merged weights give them too."""
    import transformers
    from peft import PeftModel

    from mftune.checkpoint.export import export_adapter_dir
    from mftune.checkpoint.formats.single_file import save_complete
    from mftune.checkpoint.load import fingerprint, load_checkpoint
    from mftune.checkpoint.merge import merge_lora_checkpoint
    from mftune.checkpoint.safetensors_io import load_tensors
    from mftune.models.llama import LlamaForCausalLM
    from peft_base import build_base

    base = build_base(tmp_path)
    pet_config = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=".*wq|.*wv", init_lora_weights=init)
    model = LlamaForCausalLM(dict(base.model_config))
    get_pet_model(model, pet_config)
    model.load_state_dict(load_tensors(base.path), strict=False)
    init_from_weights(model)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ours = model.eval()(base.ids)
    trained = {k: v for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}
    src = str(tmp_path / "pissa.safetensors")
    save_complete(src, trained, model_config={**base.model_config, "pet_config": pet_config},
                  extra_metadata={"pet_config": pet_config, "base_checkpoint": {"path": base.path,
                                                                                 "fingerprint": fingerprint(base.path)}})
    config, _ = export_adapter_dir(src, str(tmp_path / "adapter"))
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    hf = transformers.LlamaForCausalLM(base.cfg).float().eval()
    hf.load_state_dict(base.hf_state, strict=False)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(input_ids=base.ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    merge_lora_checkpoint(src, str(tmp_path / "merged"))
    merged = LlamaForCausalLM(dict(base.model_config))
    load_checkpoint(merged, str(tmp_path / "merged" / "merged_lora.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(base.ids), ours, rtol=0, atol=1e-5)
    reloaded = LlamaForCausalLM(dict(base.model_config))  # a run loading the checkpoint: A0, B0 from the base again
    get_pet_model(reloaded, pet_config)
    report = load_checkpoint(reloaded, src)
    init_from_weights(reloaded, report["loaded"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(base.ids), ours, rtol=0, atol=1e-6)
