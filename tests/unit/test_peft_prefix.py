"""Prefix tuning / P-tuning v2 <-> PEFT's PREFIX_TUNING adapters, against peft itself.

PEFT feeds the prefix as a KV cache (real tokens at positions P..); mftune (MindFormers) keeps them at 0.. with
unrotated prefix keys. Export rotates the keys by RoPE at P, import rotates them back
(``mftune.checkpoint.formats.peft_prefix``), so that the same input gives the same logits on either side: each
test compares mftune's logits with peft's on a GQA model (4 heads, 2 KV heads: the prefix is sized by KV heads, as
PEFT does), within 1e-5 in float32.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from mftune.checkpoint.adapter_config import effective_pet_config
from mftune.checkpoint.export import export_adapter_dir
from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint, load_checkpoint
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.errors import CheckpointError
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model
from peft_base import build_base

METHODS = {
    "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 4, "mid_dim": 16, "dropout_rate": 0.0,
                     "compute_dtype": "float32"},
    "ptuning2_fp16": {"pet_type": "ptuning2", "pre_seq_len": 5, "prefix_projection": True, "projection_dim": 8,
                      "dropout_prob": 0.0},  # MindFormers' float16 prefix: exported as the values it computes
    "ptuning2_table": {"pet_type": "ptuning2", "pre_seq_len": 3, "dropout_prob": 0.0, "compute_dtype": "float32"},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("prefix_base"))


def _hf(base) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaForCausalLM(base.cfg).float().eval()
    hf.load_state_dict(base.hf_state, strict=False)
    return hf


def _prefixed(base, pet_config, seed=3) -> LlamaForCausalLM:
    """mftune's model over the base with a random prefix, far from its small initialisation."""
    model = LlamaForCausalLM(dict(base.model_config))
    get_pet_model(model, pet_config)
    missing, unexpected = model.load_state_dict(load_tensors(base.path), strict=False)
    assert not unexpected and missing and all("mindpet_delta" in k for k in missing)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mindpet_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embedding" in name else 0.3))
    return model.eval()


def _checkpoint(base, model, pet_config, path) -> str:
    tensors = {k: v for k, v in model.state_dict().items() if "mindpet_delta" in k}
    save_complete(str(path), tensors, model_config={**base.model_config, "pet_config": pet_config},
                  extra_metadata={"run_mode": "finetune", "pet_config": pet_config,
                                  "base_checkpoint": {"path": base.path, "fingerprint": fingerprint(base.path)}})
    return str(path)


@pytest.mark.parametrize("method", list(METHODS))
def test_export_gives_peft_mftunes_logits_and_loads_back(base, method, tmp_path):
    """Expected: peft, loading the exported adapter over the same base, gives mftune's logits; the directory holds
    what peft saves (prompt_embeddings only, a PREFIX_TUNING config peft reads); mftune loads it back to the
    same logits (as P-tuning v2 over the stored keys/values)."""
    model = _prefixed(base, METHODS[method])
    with torch.no_grad():
        ours = model(base.ids)
    src = _checkpoint(base, model, METHODS[method], tmp_path / "prefix.safetensors")
    out = tmp_path / "adapter"
    config, _ = export_adapter_dir(src, str(out))
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_attention_heads"] == 2  # KV heads
    assert set(load_tensors(str(out / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    peft_model = PeftModel.from_pretrained(_hf(base), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=base.ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with torch.no_grad():  # the test bites: without the rotation (keys as mftune holds them) peft differs
        plain = _hf(base)(input_ids=base.ids).logits
    assert (plain - ours).abs().max() > 1e-2

    back = LlamaForCausalLM(dict(base.model_config))
    pet_config = effective_pet_config(None, str(out), back, "predict")
    assert pet_config == {"pet_type": "ptuning2", "pre_seq_len": METHODS[method].get(
        "prefix_token_num", METHODS[method].get("pre_seq_len")), "prefix_projection": False, "dropout_prob": 0.0,
        "compute_dtype": "float32"}
    get_pet_model(back, pet_config)
    load_checkpoint(back, str(out), base=base.path)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(base.ids), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection", [True, False])
def test_adapter_peft_saved_gives_peft_logits(base, projection, tmp_path):
    """Expected: a prefix-tuning adapter peft trained (random values; with and without its projection MLP, which
    peft does not save) and saved, applied by mftune from load_checkpoint alone (its pet_config from the adapter),
    gives peft's logits."""
    torch.manual_seed(5)
    peft_model = get_peft_model(_hf(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                               prefix_projection=projection, encoder_hidden_size=16))
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=base.ids).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = LlamaForCausalLM(dict(base.model_config))
    get_pet_model(model, effective_pet_config(None, str(tmp_path / "peft"), model, "predict"))
    load_checkpoint(model, str(tmp_path / "peft"), base=base.path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(base.ids), theirs, rtol=0, atol=1e-5)


def test_adapter_of_another_model_is_refused(base, tmp_path):
    """Expected: a PEFT prefix adapter whose num_layers / token_dim do not fit the model is a CheckpointError naming
    both; one whose tensor does not fit its own config too."""
    model = _prefixed(base, METHODS["ptuning2_table"])
    out = tmp_path / "adapter"
    export_adapter_dir(_checkpoint(base, model, METHODS["ptuning2_table"], tmp_path / "p.safetensors"), str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 2}))
    fresh = LlamaForCausalLM(dict(base.model_config))
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \[3, 96\], not .* = \[3, 64\]"):
        effective_pet_config(None, str(out), fresh, "predict")
    (out / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 6, "token_dim": 8}))
    with pytest.raises(CheckpointError, match=r"num_layers=6, token_dim=8 do not fit this model \(num_layers=3, n_kv_heads \* head_dim = 16\)"):
        effective_pet_config(None, str(out), fresh, "predict")
    assert os.path.isfile(out / "adapter_model.safetensors")


def test_prefix_with_trained_base_tensors_is_not_exported(base, tmp_path):
    """Expected: a checkpoint that also trained norms (freeze_exclude) is refused, naming them: a PEFT prefix adapter
    would drop them without a word."""
    pet_config = dict(METHODS["ptuning2_table"], freeze_exclude=["*norm*"])
    model = _prefixed(base, pet_config)
    tensors = {k: v for k, v in model.state_dict().items() if "mindpet_delta" in k or "norm" in k}
    save_complete(str(tmp_path / "p.safetensors"), tensors, model_config={**base.model_config, "pet_config": pet_config},
                  extra_metadata={"pet_config": pet_config})
    with pytest.raises(CheckpointError, match="besides its prefix it holds trained base tensors"):
        export_adapter_dir(str(tmp_path / "p.safetensors"), str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter")


def test_part_of_a_prefix_is_refused(base, tmp_path):
    """Expected: a table trained without projection loaded into a model with one (MindFormers' ptuning2 YAML sets
    prefix_projection) is an error naming a missing tensor, not a table beside a random MLP."""
    table_only = _prefixed(base, METHODS["ptuning2_table"])
    path = _checkpoint(base, table_only, METHODS["ptuning2_table"], tmp_path / "table.safetensors")
    model = LlamaForCausalLM(dict(base.model_config))
    get_pet_model(model, dict(METHODS["ptuning2_table"], prefix_projection=True))
    with pytest.raises(CheckpointError, match="holds part of this model's prefix but not mindpet_delta_ptuning2_trans"):
        load_checkpoint(model, path)
