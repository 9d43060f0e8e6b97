"""A PEFT adapter given as load_checkpoint means what its adapter_config.json says (issue 14, item 1):
``mftune.checkpoint.adapter_config`` decides the run's pet_config before ``mftune.trainer.build`` applies it.

The reference is peft itself (0.21.2): adapters are saved by ``get_peft_model(...).save_pretrained`` with random
A and B (``init_lora_weights=False``) over the base of tests/peft_base.py (3 layers, GQA), and the expected logits
are the ``PeftModel``'s, fp32, within 1e-5. The run is built by ``build_model`` from configs/llama2/
lora_llama2_demo.yaml with that base's model_config, as run_finetune.py builds it.
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from mftune.checkpoint.adapter_config import effective_pet_config, peft_selected
from mftune.config.load import load_config
from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM
from mftune.parallel.mesh import ParallelContext
from mftune.pet import lora_layers
from mftune.trainer.build import build_model

import peft_base

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

DEMO = "configs/llama2/lora_llama2_demo.yaml"
YAML_PET = {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
            "target_modules": ".*wq|.*wk|.*wv|.*wo"}  # what the run's YAML says; the adapter says otherwise
ADAPTER = {"r": 4, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return peft_base.build_base(tmp_path_factory.mktemp("adapter_config"))


def _peft_adapter(base, directory, **lora_kwargs):
    """peft's save_pretrained of a random adapter over the base; the base file copied beside it (as a user
    starts from base + adapter); returns the PeftModel in eval mode."""
    hf = transformers.LlamaForCausalLM(base.cfg)
    hf.load_state_dict(base.hf_state)
    torch.manual_seed(3)
    config = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)  # A and B random
    model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():  # trained copies of modules_to_save: other values than the base's
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape) * 0.05)
    model.save_pretrained(str(directory))
    shutil.copy(base.path, directory / "base.safetensors")
    return model


def _build(base, adapter_dir, pet_config, run_mode="predict"):
    mc = {**base.model_config, "pet_config": pet_config}
    cfg = load_config(DEMO, {"model.model_config": mc, "load_checkpoint": str(adapter_dir), "run_mode": run_mode},
                      check_files=False)
    return build_model(cfg, LlamaConfig.from_dict(cfg.model.model_config), ParallelContext())


def _assert_peft_logits(built, peft_model, base):
    with torch.no_grad():
        torch.testing.assert_close(built.model.eval()(base.ids), peft_model(input_ids=base.ids).logits,
                                   atol=1e-5, rtol=0)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_adapter_values_win_over_the_yaml_with_a_warning_each(base, tmp_path, caplog):
    """YAML r 16 / alpha 16 / wq|wk|wv|wo, adapter r 4 / alpha 64 / [q_proj, v_proj]: peft's logits, the adapter's
    pet_config recorded (BuiltModel.pet_config is what the run's checkpoints record), each difference logged."""
    peft_model = _peft_adapter(base, tmp_path / "adapter", **ADAPTER)
    with caplog.at_level(logging.INFO, logger="mftune"):
        built = _build(base, tmp_path / "adapter", YAML_PET)
    _assert_peft_logits(built, peft_model, base)
    assert {k: built.pet_config[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")} == {
        "lora_rank": 4, "lora_alpha": 64, "lora_dropout": 0.0, "target_modules": ".*wq|.*wv"}
    assert built.model.config.pet_config == built.pet_config
    assert [n for n, _ in lora_layers(built.model)] == [f"model.layers.{i}.attention.{w}" for i in range(3)
                                                        for w in ("wq", "wv")]
    where = str(tmp_path / "adapter" / "adapter_config.json")
    warnings = _warnings(caplog)
    for expected in (f"model.model_config.pet_config.lora_alpha=16 (YAML) is replaced by the adapter's "
                     f"lora_alpha=64 ({where})",
                     f"model.model_config.pet_config.lora_rank=16 (YAML) is replaced by the adapter's r=4 ({where})",
                     "model.model_config.pet_config.lora_dropout=0.05 (YAML) is replaced by the adapter's "
                     "lora_dropout=0.0",
                     "model.model_config.pet_config.target_modules='.*wq|.*wk|.*wv|.*wo' (YAML) is replaced by the "
                     "adapter's target_modules=[",  # peft saves the list in set order
                     f"({where}): LoRA on 6 layers (model.layers.0.attention.wq, model.layers.0.attention.wv, "):
        assert any(expected in w for w in warnings), (expected, warnings)


def test_an_equivalent_yaml_is_kept_without_warnings(base, tmp_path, caplog):
    """The same rank, alpha, dropout and layers, spelled another way: nothing to warn about, the YAML's regex kept."""
    peft_model = _peft_adapter(base, tmp_path / "adapter", **ADAPTER)
    same = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 64.0, "lora_dropout": 0.0, "target_modules": ["wq", "wv"],
            "param_init_type": "float32"}
    with caplog.at_level(logging.INFO, logger="mftune"):
        built = _build(base, tmp_path / "adapter", same)
    assert not [w for w in _warnings(caplog) if "pet_config" in w]
    assert built.pet_config["target_modules"] == ["wq", "wv"] and built.pet_config["param_init_type"] == "float32"
    _assert_peft_logits(built, peft_model, base)


@pytest.mark.parametrize("run_mode, level", [("predict", logging.INFO), ("finetune", logging.WARNING)])
def test_a_run_without_pet_config_applies_the_adapters(base, tmp_path, caplog, run_mode, level):
    peft_model = _peft_adapter(base, tmp_path / "adapter", **ADAPTER)
    with caplog.at_level(logging.INFO, logger="mftune"):
        built = _build(base, tmp_path / "adapter", None, run_mode=run_mode)
    assert built.pet_config["lora_alpha"] == 64 and built.pet_config["lora_rank"] == 4
    assert all(p.requires_grad == ("mindpet_delta_lora" in n) for n, p in built.model.named_parameters())
    assert any(r.levelno == level and "pet_config is empty and load_checkpoint=" in r.getMessage()
               for r in caplog.records)
    _assert_peft_logits(built, peft_model, base)


@pytest.mark.parametrize("lora_kwargs, modules", [
    ({"r": 2, "lora_alpha": 5, "target_modules": ["o_proj", "gate_proj"], "layers_to_transform": [0, 2],
      "layers_pattern": "layers"}, ["model.layers.0.attention.wo", "model.layers.0.feed_forward.w1",
                                    "model.layers.2.attention.wo", "model.layers.2.feed_forward.w1"]),
    ({"r": 2, "lora_alpha": 3, "target_modules": ["k_proj"], "layers_to_transform": 1},
     ["model.layers.1.attention.wk"]),
    ({"r": 2, "lora_alpha": 6, "target_modules": r"model\.layers\.[12]\.mlp\.(up|down)_proj"},
     [f"model.layers.{i}.feed_forward.{w}" for i in (1, 2) for w in ("w2", "w3")]),
    ({"r": 3, "lora_alpha": 7, "lora_dropout": 0.1, "target_modules": "all-linear"},
     [f"model.layers.{i}.{leaf}" for i in range(3) for leaf in ("attention.wq", "attention.wk", "attention.wv",
                                                                "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                                "feed_forward.w3")]),
    ({"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
     [f"model.layers.{i}.attention.{w}" for i in range(3) for w in ("wq", "wv")]),
    ({"r": 4, "lora_alpha": 6, "use_dora": True, "target_modules": ["q_proj", "down_proj"]},
     [f"model.layers.{i}.{w}" for i in range(3) for w in ("attention.wq", "feed_forward.w2")]),
    ({"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
     [f"model.layers.{i}.attention.{w}" for i in range(3) for w in ("wq", "wv")]),
], ids=["list_layers_to_transform_pattern", "int_layer", "regex", "all_linear", "rslora", "dora", "modules_to_save"])
def test_peft_selections_are_honoured(base, tmp_path, lora_kwargs, modules):
    peft_model = _peft_adapter(base, tmp_path / "adapter", **lora_kwargs)
    built = _build(base, tmp_path / "adapter", YAML_PET)
    assert [n for n, _ in lora_layers(built.model)] == modules
    assert built.pet_config["lora_alpha"] == lora_kwargs["lora_alpha"]
    assert built.pet_config["lora_dropout"] == lora_kwargs.get("lora_dropout", 0.0)
    assert built.pet_config["use_rslora"] == lora_kwargs.get("use_rslora", False)
    assert built.pet_config["use_dora"] == lora_kwargs.get("use_dora", False)
    assert built.pet_config["modules_to_save"] == (["lm_head", "model.tok_embeddings"] if "modules_to_save" in
                                                   lora_kwargs else None)
    _assert_peft_logits(built, peft_model, base)


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, expected", [
    ({"use_rslora": "yes"}, r'use_rslora="yes" is invalid: must be true or false'),
    ({"modules_to_save": ["lm_head"]}, r'modules_to_save=\[.lm_head.\] but the file holds no tensor of .lm_head.'),
    ({"use_dora": True}, r"LoRA module model\.layers\.0\.attention\.wq lacks a DoRA magnitude"),
    ({"bias": "all"}, r'bias="all" is invalid'),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=true is invalid"),
    ({"init_lora_weights": "pissa"}, r'init_lora_weights="pissa" is invalid'),
    ({"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
     r'target_modules=\["q_proj", "v_proj", "embed_tokens"\] is invalid: it puts LoRA on model\.embed_tokens'),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]},
     r"selects model\.layers\.0\.self_attn\.k_proj \(3 such modules\), for which the adapter's weights hold no LoRA"),
    ({"target_modules": ["q_proj"]}, r"hold LoRA for model\.layers\.0\.self_attn\.v_proj \(3 such modules\), which "
                                     r'target_modules=\["q_proj"\] does not select'),
    ({"target_modules": "q_proj", "layers_to_transform": [0]},
     r"layers_to_transform=\[0\] is invalid: peft refuses it with a regex target_modules"),
    ({"target_modules": "(q_proj"}, r'target_modules="\(q_proj" is invalid: not a valid regular expression'),
], ids=["rslora", "modules_to_save", "dora", "bias", "fan_in_fan_out", "pissa", "embedding", "more_than_weights",
        "fewer_than_weights", "regex_with_layers", "bad_regex"])
def test_what_mftune_cannot_honour_is_refused_naming_the_field(base, tmp_path, changes, expected):
    _peft_adapter(base, tmp_path / "adapter", **ADAPTER)
    _edit_config(tmp_path / "adapter", **changes)
    with pytest.raises(CheckpointError, match=expected):
        _build(base, tmp_path / "adapter", YAML_PET)


def test_lora_on_lm_head_saved_by_peft_gives_peft_logits(base, tmp_path):
    """An adapter peft saved with LoRA on q_proj and lm_head (target_modules naming it): applied from load_checkpoint
    alone, mftune wraps lm_head too and gives peft's logits."""
    peft_model = _peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    built = _build(base, tmp_path / "adapter", None)
    assert built.pet_config["target_modules"] == ".*wq|lm_head"
    assert type(built.model.lm_head).__name__ == "LoRALinear"
    _assert_peft_logits(built, peft_model, base)


def test_an_adapter_for_a_deeper_model_is_refused(base, tmp_path):
    _peft_adapter(base, tmp_path / "adapter", **ADAPTER)
    with torch.device("meta"):
        shallow = LlamaForCausalLM({**base.model_config, "num_layers": 2})
    with pytest.raises(CheckpointError, match=r"holds LoRA for model\.layers\.2\.self_attn\.q_proj but the model "
                                              r"has num_layers=2"):
        effective_pet_config(YAML_PET, str(tmp_path / "adapter"), shallow, "predict")


def test_other_checkpoints_keep_the_run_pet_config(base):
    with torch.device("meta"):
        model = LlamaForCausalLM(dict(base.model_config))
    assert effective_pet_config(YAML_PET, base.path, model, "finetune") is YAML_PET
    assert effective_pet_config(None, "", model, "finetune") is None


def test_peft_matching_rules():
    """peft's check_target_module_exists, for the names of a 2-layer Llama (mftune module paths returned)."""
    def sel(**config):
        return sorted(peft_selected(config, 2, "adapter_config.json"))

    assert sel() == sel(target_modules=["q_proj", "v_proj"])  # peft's default for Llama
    assert sel(target_modules=["self_attn.q_proj"]) == ["model.layers.0.attention.wq", "model.layers.1.attention.wq"]
    assert sel(target_modules=".*q_proj") == sel(target_modules=["q_proj"])  # fullmatch
    assert sel(target_modules="q_proj") == []  # fullmatch of the whole name: nothing
    assert sel(target_modules=["q_proj"], layers_to_transform=[1]) == ["model.layers.1.attention.wq"]
    assert sel(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks") == []
    assert sel(target_modules=["q_proj", "down_proj"], exclude_modules=["down_proj"]) == sel(target_modules=["q_proj"])
    assert len(sel(target_modules="ALL-LINEAR")) == 14
