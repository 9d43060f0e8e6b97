"""S-LoRA multi-adapter predict (pet_type slora, mftune/pet/slora.py) against peft and against each adapter alone.

Three adapters peft trained (random values) with different ranks, alphas, rsLoRA and target modules, named in an
adapter_path JSON: in one batch, each row's logits are peft's for that row's adapter (slot 0: the base model's),
within 1e-5 in float32, and greedy decoding of a batch with one adapter per prompt equals each adapter run alone
(mftune's LoRA model loaded from that adapter).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from mftune.checkpoint import slora_adapters
from mftune.checkpoint.adapter_config import effective_pet_config
from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.errors import CheckpointError
from mftune.generation import generate
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model
from mftune.pet.slora import set_adapter_ids
from mftune.trainer.predict import adapter_slots
from peft_base import build_base

ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_rslora": dict(r=2, lora_alpha=6, target_modules=["o_proj", "down_proj"], use_rslora=True),
    "wide": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(base, adapter_path JSON, {name: peft model in eval mode})."""
    d = tmp_path_factory.mktemp("slora")
    base = build_base(d)
    peft_models, paths = {}, {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        hf = transformers.LlamaForCausalLM(base.cfg).float()
        hf.load_state_dict(base.hf_state, strict=False)
        model = get_peft_model(hf, PeftLoraConfig(**config))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(str(d / name))
        peft_models[name], paths[name] = model.eval(), name  # relative to the JSON file's folder
    (d / "adapters.json").write_text(json.dumps(paths))
    return base, str(d / "adapters.json"), peft_models


def _slora_model(base, adapter_path) -> LlamaForCausalLM:
    model = LlamaForCausalLM(dict(base.model_config))
    names = slora_adapters.apply(model, adapter_path)
    assert names == list(ADAPTERS)
    model.load_state_dict(load_tensors(base.path), strict=False)
    slora_adapters.load(model, adapter_path)
    return model.eval()


def test_each_row_gets_its_adapter_as_peft_computes_it(adapters):
    base, adapter_path, peft_models = adapters
    model = _slora_model(base, adapter_path)
    ids = base.ids[:1].repeat(4, 1)  # the same tokens in every row: only the adapter differs
    set_adapter_ids(model, [1, 2, 3, 0])
    with torch.no_grad():
        ours = model(ids)
        expected = [peft_models[name](input_ids=ids[:1]).logits[0] for name in ADAPTERS]
        with peft_models["qv"].disable_adapter():
            expected.append(peft_models["qv"](input_ids=ids[:1]).logits[0])
    for row in range(4):
        torch.testing.assert_close(ours[row], expected[row], rtol=0, atol=1e-5)
    assert all((expected[i] - expected[3]).abs().max() > 1e-2 for i in range(3))  # each adapter matters
    assert not any(p.requires_grad for p in model.parameters())


def test_one_batch_decodes_like_each_adapter_alone(adapters):
    """Expected: mftune's single-adapter LoRA model of each adapter (its PEFT directory as load_checkpoint)."""
    base, adapter_path, _ = adapters
    model = _slora_model(base, adapter_path)
    prompts = [base.ids[0, :5].tolist(), base.ids[1, :8].tolist(), base.ids[0, 3:9].tolist()]
    set_adapter_ids(model, [1, 2, 3])
    together = generate(model, prompts, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    dirs = slora_adapters.adapter_dirs(adapter_path)
    for prompt, name, got in zip(prompts, ADAPTERS, together):
        alone = LlamaForCausalLM(dict(base.model_config))
        get_pet_model(alone, effective_pet_config(None, dirs[name], copy.deepcopy(alone), "predict"))
        load_checkpoint(alone, dirs[name], base=base.path)
        assert got == generate(alone.eval(), [prompt], max_new_tokens=6, eos_token_id=None, pad_token_id=0)[0], name


def test_adapter_ids_from_the_command_line_or_the_prompts_file(adapters, caplog):
    _, adapter_path, _ = adapters
    pet = {"pet_type": "slora", "adapter_path": adapter_path}
    assert adapter_slots(pet, "wide", [None, None], 2) == [("wide", 3), ("wide", 3)]
    assert adapter_slots(pet, ["qv", "wide"], [None, None], 2) == [("qv", 1), ("wide", 3)]
    assert adapter_slots(pet, None, ["mlp_rslora", None], 2) == [("mlp_rslora", 2), (None, 0)]
    assert "1 of 2 prompts have no adapter_id: they use the base model alone" in caplog.text
    with pytest.raises(ValueError, match=r"'code' is not an adapter .*\(its adapters: qv, mlp_rslora, wide\)"):
        adapter_slots(pet, "code", [None], 1)
    with pytest.raises(ValueError, match="--adapter_id has 2 values for 3 prompts"):
        adapter_slots(pet, ["qv", "wide"], [None] * 3, 3)
    with pytest.raises(ValueError, match="both choose adapters"):
        adapter_slots(pet, "qv", ["wide"], 1)


def test_bad_adapter_path_is_named(adapters, tmp_path):
    base, _, _ = adapters
    model = LlamaForCausalLM(dict(base.model_config))
    with pytest.raises(CheckpointError, match="adapter_path=.*missing.json does not exist"):
        slora_adapters.apply(model, str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a non-empty JSON object of adapter names to directories"):
        slora_adapters.apply(model, str(tmp_path / "list.json"))
    (tmp_path / "nodir.json").write_text(json.dumps({"a": "nowhere"}))
    with pytest.raises(CheckpointError, match="adapter 'a' is nowhere, which is not a directory"):
        slora_adapters.apply(model, str(tmp_path / "nodir.json"))


def test_an_adapter_with_its_own_head_is_refused(adapters, tmp_path):
    """peft's save_embedding_layers copy of lm_head: one S-LoRA head serves every row, so a copy that differs from
    the base's is an error naming the adapter (equal copies load)."""
    import shutil

    from mftune.checkpoint.safetensors_io import save_safetensors

    base, adapter_path, _ = adapters
    shutil.copytree(slora_adapters.adapter_dirs(adapter_path)["qv"], tmp_path / "qv")
    weights = tmp_path / "qv" / "adapter_model.safetensors"
    tensors = load_tensors(str(weights))
    head = load_tensors(base.path)["lm_head.weight"]
    for value, fails in ((head.clone(), False), (head + 1, True)):
        save_safetensors({**tensors, "base_model.model.lm_head.base_layer.weight": value}, str(weights),
                         {"format": "pt"})
        (tmp_path / "one.json").write_text(json.dumps({"qv": str(tmp_path / "qv")}))
        model = LlamaForCausalLM(dict(base.model_config))
        slora_adapters.apply(model, str(tmp_path / "one.json"))
        model.load_state_dict(load_tensors(base.path), strict=False)
        if fails:
            with pytest.raises(CheckpointError, match="adapter 'qv'\\) carries its own lm_head weights"):
                slora_adapters.load(model, str(tmp_path / "one.json"))
        else:
            slora_adapters.load(model, str(tmp_path / "one.json"))
