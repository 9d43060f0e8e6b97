"""PEFT adapter export / import (mftune.checkpoint.export, mftune.checkpoint.formats.peft_adapter, and
scripts/export_adapter.py in-process; the real subprocess: tests/e2e/test_export_script.py).

The reference is peft itself (installed version; checked with 0.21.2): an exported adapter must load
with ``PeftModel.from_pretrained`` on the transformers model holding the same base weights without a
missing/unexpected-key warning, and give mftune's logits; an adapter peft saved must give peft's
logits once read into mftune. The LoRA checkpoints are written by the trainer's own
CheckpointMonitor after one AdamW step, as run_finetune.py --run_mode finetune writes them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.errors import CheckpointError
from mftune.checkpoint.formats.peft_adapter import mftune_to_peft_name, peft_to_mftune_name, read_peft_adapter
from mftune.pet import LORA_MARK, lora_layers

import peft_base
from peft_base import ATTN, MLP, SUBSET, lora_checkpoint, mftune_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "export_adapter.py")
# The script's main() in-process for the many error cases (a subprocess costs seconds of imports each).
_spec = importlib.util.spec_from_file_location("export_adapter", SCRIPT)
export_adapter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_adapter)

SUSPICIOUS = ("missing", "unexpected", "not found", "mismatch", "unused", "ignored")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return peft_base.build_base(tmp_path_factory.mktemp("peft_base"))


def _peft_load(base, adapter_dir, caplog):
    """PeftModel.from_pretrained on a fresh transformers model with the base weights; (model, warnings and logs)."""
    hf = transformers.LlamaForCausalLM(base.cfg)
    hf.load_state_dict(base.hf_state)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, str(adapter_dir))
    messages = [f"{w.category.__name__}: {w.message}" for w in caught] + [r.getMessage() for r in caplog.records]
    return model.eval(), messages


def _peft_lora_modules(peft_model) -> set[str]:
    return {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _expected_peft_modules(model) -> set[str]:
    return {mftune_to_peft_name(f"{n}.mindpet_delta_lora_a").removesuffix(".lora_A.weight") for n, _ in lora_layers(model)}


def _export(src, out, *extra) -> int:
    return export_adapter.main(["--src_checkpoint", str(src), "--output_dir", str(out), *extra])


@pytest.mark.parametrize("pet_config, layers, targets", [
    (ATTN, None, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (SUBSET, [0, 2], ["q_proj", "v_proj"]),
    (MLP, None, ["gate_proj", "down_proj", "up_proj"]),
    ({**SUBSET, "use_rslora": True}, [0, 2], ["q_proj", "v_proj"]),
    ({**MLP, "use_dora": True}, None, ["gate_proj", "down_proj", "up_proj"]),
    ({**SUBSET, "modules_to_save": ["lm_head", "tok_embeddings"]}, [0, 2], ["q_proj", "v_proj"]),
    ({**SUBSET, "target_modules": ".*wq|.*wv|lm_head"}, [0, 2], ["q_proj", "v_proj", "lm_head"]),
    ({**MLP, "target_modules": ".*w2|lm_head"}, None, ["down_proj", "lm_head"]),
], ids=["attention", "wq_wv_exclude_layer_1", "mlp", "rslora", "dora", "modules_to_save", "lm_head_subset",
        "lm_head"])
def test_exported_adapter_loads_in_peft_with_mftune_logits(base, tmp_path, caplog, pet_config, layers, targets):
    model, ckpt = lora_checkpoint(base, pet_config, f"run_{len(targets)}_{layers}")
    out = tmp_path / "adapter"
    assert _export(ckpt, out) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == targets and config["layers_to_transform"] == layers
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"], config["use_dora"]) == (
        pet_config["lora_rank"], pet_config["lora_alpha"], pet_config["lora_dropout"],
        pet_config.get("use_rslora", False), pet_config.get("use_dora", False))
    assert config["modules_to_save"] == (["lm_head", "model.embed_tokens"] if "modules_to_save" in pet_config else None)

    peft_model, messages = _peft_load(base, out, caplog)
    assert not [m for m in messages if any(s in m.lower() for s in SUSPICIOUS)], messages
    assert _peft_lora_modules(peft_model) == _expected_peft_modules(model)  # LoRA exactly where mftune had it
    with torch.no_grad():
        ours = model(base.ids)
        theirs = peft_model(input_ids=base.ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=base.ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapters matter, so the comparison below means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_adapter_config_and_keys_written(base, tmp_path):
    """The exact file for the attention case, and peft's key format (no adapter name inside keys)."""
    _, ckpt = lora_checkpoint(base, ATTN, "run_cfg")
    out = tmp_path / "adapter"
    assert _export(ckpt, out) == 0
    assert json.loads((out / "adapter_config.json").read_text()) == {
        "alpha_pattern": {}, "base_model_name_or_path": base.path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": 8, "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 3 * 4 * 2
    assert tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"].shape == (16, 4)  # GQA
    ckpt_tensors = load_tensors(ckpt)
    for k, v in tensors.items():
        assert torch.equal(v, ckpt_tensors[peft_to_mftune_name(k)])
    assert _export(ckpt, tmp_path / "named", "--base_model_name_or_path", "meta-llama/Llama-2-7b-hf") == 0
    assert json.loads((tmp_path / "named/adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-2-7b-hf"


def test_missing_key_warning_is_seen(base, tmp_path, caplog):
    """Negative control for the warning capture above: drop one tensor and peft must complain."""
    _, ckpt = lora_checkpoint(base, SUBSET, "run_missing")
    out = tmp_path / "adapter"
    assert _export(ckpt, out) == 0
    tensors = load_file(str(out / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _, messages = _peft_load(base, out, caplog)
    assert any("missing adapter keys" in m.lower() for m in messages), messages


@pytest.mark.parametrize("pet_config", [ATTN, SUBSET, {**SUBSET, "target_modules": ".*wq|.*wv|lm_head"}],
                         ids=["attention", "wq_wv_exclude_layer_1", "lm_head"])
def test_read_peft_adapter_round_trip(base, tmp_path, pet_config):
    model, ckpt = lora_checkpoint(base, pet_config, f"run_rt_{pet_config['lora_alpha']}")
    assert _export(ckpt, tmp_path / "adapter") == 0
    tensors, read_config = read_peft_adapter(str(tmp_path / "adapter"))
    original = {k: v for k, v in load_tensors(ckpt).items() if LORA_MARK in k and not k.startswith("adam_")}
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    for key in ("lora_rank", "lora_alpha", "lora_dropout"):
        assert read_config[key] == pet_config[key]
    # Equivalent: the same layers get LoRA, and base + read tensors give the original logits.
    again = mftune_model(base, read_config)
    assert [n for n, _ in lora_layers(again)] == [n for n, _ in lora_layers(model)]
    again.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(base.ids), model(base.ids), atol=1e-6, rtol=0)


def test_read_adapter_saved_by_peft(base, tmp_path):
    """Independent direction: peft's own save_pretrained (safetensors and .bin) read into mftune gives peft's logits."""
    hf = transformers.LlamaForCausalLM(base.cfg)
    hf.load_state_dict(base.hf_state)
    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[1],
                           layers_pattern="layers", init_lora_weights=False, task_type="CAUSAL_LM")  # A and B random
    peft_model = peft.get_peft_model(hf, lora).eval()
    peft_model.save_pretrained(str(tmp_path / "st"))
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert os.path.exists(tmp_path / "bin/adapter_model.bin")
    tensors, pet_config = read_peft_adapter(str(tmp_path / "st"))
    bin_tensors, bin_config = read_peft_adapter(str(tmp_path / "bin"))
    assert bin_config == pet_config and all(torch.equal(bin_tensors[k], v) for k, v in tensors.items())
    assert pet_config == {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 12, "lora_dropout": 0.0,
                          "use_rslora": False, "use_dora": False, "target_modules": ".*wq|.*wo|.*w3",
                          "exclude_layers": r"(?!(?:1)$)\d+$"}
    model = mftune_model(base, pet_config)
    assert [n for n, _ in lora_layers(model)] == ["model.layers.1.attention.wq", "model.layers.1.attention.wo",
                                                  "model.layers.1.feed_forward.w3"]
    model.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(base.ids), peft_model(input_ids=base.ids).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    _, ckpt = lora_checkpoint(base, ATTN, "run_err")
    out = tmp_path_factory.mktemp("peft_err") / "adapter"
    assert _export(ckpt, out) == 0
    return out


def _edited(adapter_dir, tmp_path, config_changes=None, tensor_edit=None):
    d = tmp_path / "edited"
    shutil.copytree(adapter_dir, d)
    if config_changes:
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(config_changes)
        (d / "adapter_config.json").write_text(json.dumps(config))
    if tensor_edit:
        tensors = load_file(str(d / "adapter_model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return str(d)


@pytest.mark.parametrize("changes, expected", [
    ({"use_dora": True}, "lacks a DoRA magnitude"),
    ({"use_rslora": 1}, r"use_rslora=1 is invalid: must be true or false"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] but the file holds no tensor of 'lm_head'"),
    ({"bias": "all"}, 'bias="all" is invalid'),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern=.* is invalid"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights=\"pissa_niter_4\" is invalid: this initialisation"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type=\"PREFIX_TUNING\" is invalid"),
    ({"use_dora": "yes", "bias": "lora_only"}, r"2 problem\(s\)"),
    ({"r": 8}, "r=8 is invalid: the tensors .* have rank 4"),
    ({"layers_to_transform": [0, 1]}, r"layers_to_transform=\[0, 1\] is invalid: .* layers \[0, 1, 2\]"),
])
def test_read_unsupported_config_is_an_error_naming_the_field(adapter_dir, tmp_path, changes, expected):
    with pytest.raises(CheckpointError, match=expected):
        read_peft_adapter(_edited(adapter_dir, tmp_path, config_changes=changes))


def _add_embedding_lora(t):
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)


def _drop_one_b(t):
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def _drop_one_module(t):
    for half in "AB":
        del t[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight"]


@pytest.mark.parametrize("edit, expected", [
    (_add_embedding_lora, r"not LoRA A/B of a decoder-layer Linear or lm_head \(e\.g\. "
                          r"base_model\.model\.model\.embed_tokens\.lora_embedding_A\)"),
    (_drop_one_b, r"model\.layers\.0\.attention\.wq lacks mindpet_delta_lora_b"),
    (_drop_one_module, r"not the same in every adapted layer \(e\.g\. no adapter on model\.layers\.0\.attention\.wq\)"),
])
def test_read_bad_tensors_is_an_error(adapter_dir, tmp_path, edit, expected):
    with pytest.raises(CheckpointError, match=expected):
        read_peft_adapter(_edited(adapter_dir, tmp_path, tensor_edit=edit))


def test_read_missing_files(adapter_dir, tmp_path):
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        read_peft_adapter(str(tmp_path))
    d = _edited(adapter_dir, tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        read_peft_adapter(d)


def _rewrite_header(src, dst, **changes):
    """A copy of checkpoint ``src`` with some header entries replaced (None removes one)."""
    meta = read_metadata(src)
    meta.update(changes)
    model_config = meta.pop("model_config")
    save_complete(str(dst), load_tensors(src), model_config=model_config,
                  extra_metadata={k: v for k, v in meta.items() if v is not None})
    return str(dst)


def _export_error(capsys, src, out, *extra) -> str:
    capsys.readouterr()
    assert _export(src, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_export_user_errors(base, tmp_path, capsys):
    _, ckpt = lora_checkpoint(base, ATTN, "run_user_err")
    out = tmp_path / "adapter"
    assert "its header has no pet_config" in _export_error(capsys, base.path, out)
    shard = _rewrite_header(ckpt, tmp_path / "shard.safetensors", shards={"rank": 0, "tensors": {}})
    assert "Pass the directory that holds its rank_*/ folders" in _export_error(capsys, shard, out)
    os.makedirs(tmp_path / "dist/rank_0")
    assert "holds no .safetensors file" in _export_error(capsys, tmp_path / "dist", out)
    ckpt_dir = os.path.dirname(ckpt)
    assert f"the newest here: {ckpt}" in _export_error(capsys, ckpt_dir, out)
    assert "no such file" in _export_error(capsys, tmp_path / "nope.safetensors", out)

    no_alpha = {k: v for k, v in ATTN.items() if k != "lora_alpha"}
    src = _rewrite_header(ckpt, tmp_path / "no_alpha.safetensors", pet_config=no_alpha)
    assert "pet_config.lora_alpha=None is invalid" in _export_error(capsys, src, out)
    assert "--lora_alpha=9.0 is invalid" in _export_error(capsys, ckpt, out, "--lora_alpha", "9")
    assert _export(src, out, "--lora_alpha", "16") == 0
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_export_refuses_trained_base_tensors(base, tmp_path, capsys):
    pet_config = {**ATTN, "freeze_exclude": ["*attention_norm*"]}  # norms trained too: not a pure adapter
    _, ckpt = lora_checkpoint(base, pet_config, "run_norm")
    err = _export_error(capsys, ckpt, tmp_path / "adapter")
    assert "trained base tensors (model.layers.0.attention_norm.weight" in err


def test_export_never_overwrites_without_flag(base, tmp_path, capsys):
    _, ckpt = lora_checkpoint(base, ATTN, "run_overwrite")
    out = tmp_path / "adapter"
    out.mkdir()
    assert _export(ckpt, out) == 0  # an empty directory is fine
    (out / "notes.txt").write_text("keep me")
    assert "exists and is not empty. Pass --overwrite" in _export_error(capsys, ckpt, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert "it contains src_checkpoint" in _export_error(capsys, ckpt, os.path.dirname(ckpt), "--overwrite")
    assert os.path.exists(ckpt)
    assert _export(ckpt, out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directories left behind
