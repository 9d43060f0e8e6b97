"""Hugging Face exports are complete (issue 13 item 4): the reversed conversion, the merged LoRA in HF format
and the PEFT adapter carry the base directory's tokenizer files, chat template, generation_config and
config.json (byte for byte; the dtype updated when cast), found from what the checkpoint records or given.

References: the source directory's own files (byte equality), transformers' AutoTokenizer on the source
directory (ids), transformers' greedy ``generate`` of the source model (reversed) and a greedy loop over
mftune's LoRA model (merged; mftune's logits equal transformers', tests/unit/test_model.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from mftune.checkpoint.convert import convert_hf_to_mftune, convert_mftune_to_hf
from mftune.checkpoint.export import export_adapter_dir
from mftune.checkpoint.hf_files import TOKENIZER_FILES, recorded_hf_dir, resolve_base, summary
from mftune.checkpoint.merge import merge_lora_checkpoint
from mftune.errors import CheckpointError
from hf_export_dirs import SAMPLE, greedy, lora_over, prompt_ids, save_hf_dir
from tiny_hf import hf_model

TOKENIZER_SAVED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")  # what transformers 5 writes


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The HF directory, its transformers model, and the mftune file converted from it."""
    d = tmp_path_factory.mktemp("hf_export")
    hf_dir = str(d / "hf")
    model = save_hf_dir(hf_dir)
    base = str(d / "base.safetensors")
    convert_hf_to_mftune(hf_dir, base)
    return {"dir": d, "hf": hf_dir, "model": model, "base": base}


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _check_loads(out: str, hf_dir: str, expected_ids: list[int]) -> None:
    """AutoTokenizer and AutoModelForCausalLM load ``out``; generate gives ``expected_ids``."""
    tok, ref_tok = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok(SAMPLE).input_ids == ref_tok(SAMPLE).input_ids
    ids = prompt_ids(tok)
    assert ids.tolist() == prompt_ids(ref_tok).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.max_new_tokens == 7  # the base's generation_config, not a derived one
    with torch.no_grad():
        assert model.generate(ids, do_sample=False)[0].tolist() == expected_ids


def test_reversed_conversion_copies_the_recorded_base_files(src, tmp_path):
    out = str(tmp_path / "back")
    report = convert_mftune_to_hf(src["base"], out)
    for name in (*TOKENIZER_SAVED, "generation_config.json", "config.json"):
        assert _bytes(os.path.join(out, name)) == _bytes(os.path.join(src["hf"], name)), name
    assert report["hf_files"].base.directory == src["hf"] and report["hf_files"].missing == []
    assert "Copied from " + src["hf"] in summary(report["hf_files"])
    with torch.no_grad():
        expected = src["model"].generate(prompt_ids(transformers.AutoTokenizer.from_pretrained(src["hf"])),
                                         do_sample=False, max_new_tokens=7)[0].tolist()
    _check_loads(out, src["hf"], expected)


def test_cast_changes_only_the_dtype_of_the_base_config(src, tmp_path):
    out = str(tmp_path / "bf16")
    convert_mftune_to_hf(src["base"], out, dtype="bf16")
    with open(os.path.join(src["hf"], "config.json")) as f:
        base = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written == {**base, "dtype": "bfloat16"}  # transformers 5 spells it dtype: no torch_dtype added
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_no_base_is_said_and_a_given_directory_fills_in(src, tmp_path):
    bare = str(tmp_path / "bare.safetensors")  # the same weights, no recorded origin
    convert_hf_to_mftune(src["hf"], bare)
    moved = str(tmp_path / "moved")
    os.rename(src["hf"], moved)
    try:
        assert recorded_hf_dir(bare) is None
        report = convert_mftune_to_hf(bare, str(tmp_path / "a"))["hf_files"]
        text = summary(report)
        assert "no tokenizer files" in text and "pass --tokenizer_dir" in text and "config.json derived" in text
        assert not os.path.exists(tmp_path / "a" / "tokenizer.json")
        report = convert_mftune_to_hf(bare, str(tmp_path / "b"), base_model_dir=moved)["hf_files"]
        assert report.missing == [] and set(TOKENIZER_SAVED) <= set(report.copied)
        assert _bytes(str(tmp_path / "b" / "tokenizer.json")) == _bytes(os.path.join(moved, "tokenizer.json"))
    finally:
        os.rename(moved, src["hf"])


def test_a_base_of_another_architecture_is_refused_before_writing(src, tmp_path):
    other = str(tmp_path / "other")
    hf_model(n_kv_heads=4, vocab_size=320).save_pretrained(other)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"num_key_value_heads=2 .*vs 4"):
        convert_mftune_to_hf(src["base"], str(out), base_model_dir=other)
    assert not out.exists() or not os.listdir(out)
    with pytest.raises(CheckpointError, match="would be overwritten"):
        convert_mftune_to_hf(src["base"], src["hf"])
    with pytest.raises(CheckpointError, match="base_model_dir=.* is not a directory"):
        resolve_base(str(tmp_path / "nowhere"), src["base"])


@pytest.mark.parametrize("over", ["converted", "hf_dir"])
def test_merged_lora_directory_is_complete(src, tmp_path, over):
    """The LoRA's base is the converted file (its origin followed) or the HF directory itself."""
    lora_path = str(tmp_path / "lora.safetensors")
    lora_model = lora_over(src["base"] if over == "converted" else src["hf"], lora_path)
    out = str(tmp_path / "merged")
    report = merge_lora_checkpoint(lora_path, out, output_format="hf")["hf_files"]
    assert report.base.directory == src["hf"] and report.missing == [] and report.config == "copied"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    _check_loads(out, src["hf"], greedy(lora_model, prompt_ids(tok)))


def test_adapter_gets_the_tokenizer_and_names_the_hf_base(src, tmp_path):
    lora_path = str(tmp_path / "lora.safetensors")
    lora_over(src["base"], lora_path)
    out = str(tmp_path / "adapter")
    config, report = export_adapter_dir(lora_path, out, fallback={"lora_dropout": 0.0})  # PET records none
    assert config["base_model_name_or_path"] == src["hf"]
    assert set(report.copied) == set(TOKENIZER_SAVED) and report.missing == []
    assert not os.path.exists(os.path.join(out, "config.json"))  # a PEFT adapter, not a model directory
    assert not (set(os.listdir(out)) - {*TOKENIZER_FILES, "adapter_config.json", "adapter_model.safetensors"})
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(SAMPLE).input_ids == transformers.AutoTokenizer.from_pretrained(src["hf"])(SAMPLE).input_ids
