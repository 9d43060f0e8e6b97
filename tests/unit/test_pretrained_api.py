"""A Hugging Face directory as a model: the merge rules of ``pretrained_model_dir``
(``mftune.checkpoint.pretrained``), the run configuration it completes (``mftune.trainer.pretrained``), and
the Python API (``from mftune import LlamaForCausalLM, load_tokenizer, apply_chat_template``), against
transformers on the same directory."""
from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch
from hf_llama3_dir import llama3_style_dir

import mftune
from mftune.checkpoint.pretrained import directory_model_config, merge_model_config
from mftune.config.load import load_config
from mftune.config.schema import MFConfig
from mftune.errors import ConfigError
from mftune.models import llama
from mftune.models.config import LlamaConfig
from mftune.trainer.pretrained import apply_pretrained_dir

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                      "llama3", "lora_pretrained_dir.yaml")

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The Llama 3-style directory saved in bfloat16 (its torch_dtype), with bfloat16-exact values."""
    return llama3_style_dir(str(tmp_path_factory.mktemp("hf") / "model"), torch.bfloat16)


def _merge(given, hf_dir, gpu=False):
    return merge_model_config(given, directory_model_config(hf_dir[0]), hf_dir[0], gpu=gpu)


def test_keys_left_out_come_from_config_json(hf_dir):
    merged = _merge({"pet_config": None}, hf_dir)
    mc = merged.model_config
    assert (mc["theta"], mc["extend_method"], mc["n_kv_heads"], mc["tie_word_embeddings"]) == (500000.0, "LLAMA3", 2, True)
    assert mc["scaling_factor"]["original_max_position_embeddings"] == 16 and mc["eos_token_id"] == [1, 4]
    assert mc["seq_length"] == 128  # min(2048, max_position_embeddings)
    assert (mc["compute_dtype"], mc["param_init_type"]) == ("float32", "float32")  # CPU
    assert "theta" in merged.from_directory and "seq_length" not in merged.from_directory


def test_dtypes_follow_the_device_and_the_yaml(hf_dir):
    gpu = _merge({}, hf_dir, gpu=True).model_config
    assert (gpu["compute_dtype"], gpu["param_init_type"]) == ("bfloat16", "bfloat16")
    half = _merge({"param_init_type": "float16"}, hf_dir).model_config  # autocast in the dtype asked for
    assert (half["compute_dtype"], half["param_init_type"]) == ("float16", "float16")
    given = _merge({"compute_dtype": "float16", "seq_length": 64}, hf_dir).model_config  # one dtype: no 2nd rounding
    assert (given["compute_dtype"], given["param_init_type"], given["seq_length"]) == ("float16", "float16", 64)
    fp16_dir = {**directory_model_config(hf_dir[0]), "param_init_type": "float16"}  # a Llama 2 download
    merged = merge_model_config({}, fp16_dir, hf_dir[0], gpu=True)
    assert merged.model_config["compute_dtype"] == "bfloat16" and "float16 would need loss scaling" in merged.notes[-1]
    old_gpu = merge_model_config({}, fp16_dir, hf_dir[0], gpu=True, bf16=False).model_config
    assert (old_gpu["compute_dtype"], old_gpu["param_init_type"]) == ("float16", "float16")


def test_a_yaml_naming_its_pad_id_keeps_mindformers_pad_masking(hf_dir):
    """A MindFormers YAML (naming pad_token_id) over a Hugging Face load_checkpoint: the pad mask stays as it is
    with any other checkpoint; a YAML naming no pad id takes transformers' behaviour (no id masking)."""
    mindformers = {"pad_token_id": 5, "compute_dtype": "float32"}  # a pad id that is not bos or eos
    cfg = dataclasses.replace(MFConfig(), load_checkpoint=hf_dir[0],
                              model=dataclasses.replace(MFConfig().model, model_config=mindformers))
    run = apply_pretrained_dir(cfg, gpu=False)
    assert "mask_pad_token" not in run.model.model_config and run.load_checkpoint == hf_dir[0]
    assert llama.pad_mask_id(LlamaConfig(**run.model.model_config)) == 5
    assert _merge({}, hf_dir).model_config["mask_pad_token"] is False


def test_architecture_that_disagrees_is_an_error_naming_both_values(hf_dir):
    with pytest.raises(ConfigError) as e:
        _merge({"theta": 10000.0, "num_heads": 4, "tie_word_embeddings": False, "hidden_size": 128}, hf_dir)
    text = str(e.value)
    assert "model.model_config.theta=10000.0 is invalid" in text and "config.json has theta=500000.0" in text
    assert "tie_word_embeddings=False" in text and "hidden_size=128" in text
    assert "num_heads=4 is invalid" not in text  # it agrees


def test_a_differing_token_id_is_kept_and_said(hf_dir):
    merged = _merge({"eos_token_id": 4}, hf_dir)
    assert merged.model_config["eos_token_id"] == 4
    assert merged.warnings == ["model.model_config.eos_token_id=4 is used, not config.json's [1, 4]"]


def test_run_config_takes_weights_tokenizer_and_template(hf_dir, caplog):
    cfg = dataclasses.replace(MFConfig(), pretrained_model_dir=hf_dir[0])
    with caplog.at_level(logging.INFO, logger="mftune"):
        out = apply_pretrained_dir(cfg, gpu=False)
    tok = out.processor.tokenizer
    assert out.load_checkpoint == hf_dir[0] and tok.vocab_file == hf_dir[0] and tok.chat_template == "hf"
    assert out.model.model_config["theta"] == 500000.0 and "conversation template hf" in caplog.text
    # a tokenizer named in the YAML keeps MindFormers' defaults; a load_checkpoint keeps its weights
    named = dataclasses.replace(cfg, load_checkpoint="lora.safetensors", processor=dataclasses.replace(
        cfg.processor, tokenizer=dataclasses.replace(cfg.processor.tokenizer, vocab_file="tok.model")))
    out = apply_pretrained_dir(named, gpu=False)
    assert out.load_checkpoint == "lora.safetensors" and out.processor.tokenizer.chat_template is None
    assert apply_pretrained_dir(MFConfig(), gpu=False) == MFConfig()  # no directory: unchanged


def test_from_pretrained_gives_transformers_logits(hf_dir, caplog):
    directory, reference, _ = hf_dir
    with caplog.at_level(logging.INFO, logger="mftune"):
        model = mftune.LlamaForCausalLM.from_pretrained(directory)
    assert "compute_dtype float32, param_init_type float32 (CPU; config.json's torch_dtype is bfloat16)" in caplog.text
    assert isinstance(model, llama.LlamaForCausalLM) and not model.training
    assert model.lm_head.weight is model.model.tok_embeddings.embedding_weight  # tied
    ids = torch.randint(0, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)
    half = mftune.LlamaForCausalLM.from_pretrained(directory, dtype="bfloat16", seq_length=64)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.config.seq_length == 64
    with pytest.raises(ConfigError, match="config.json has n_kv_heads=2"):
        mftune.LlamaForCausalLM.from_pretrained(directory, n_kv_heads=4)
    with pytest.raises(ValueError, match="get_pet_model"):
        mftune.LlamaForCausalLM.from_pretrained(directory, pet_config={"pet_type": "lora"})


def test_load_tokenizer_and_chat_template_give_transformers_ids(hf_dir):
    directory, _, ref = hf_dir
    tok = mftune.load_tokenizer(directory)
    text = "Hello world! 你好 😀"
    assert tok.encode(text, add_bos=ref("x").input_ids[0] == ref.bos_token_id) == ref(text).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert mftune.apply_chat_template(tok, messages, add_generation_prompt=True) == expected


def test_the_readme_api_example_generates_what_transformers_generates(hf_dir):
    """README's Python API lines on the tiny directory: the same greedy answer as transformers' generate."""
    from mftune import LlamaForCausalLM, apply_chat_template, load_tokenizer
    from mftune.generation import generate

    directory, reference, ref_tok = hf_dir
    model, tok = LlamaForCausalLM.from_pretrained(directory), load_tokenizer(directory)
    ids = apply_chat_template(tok, [{"role": "user", "content": "What is LoRA?"}], add_generation_prompt=True)
    answer = generate(model, [ids], max_new_tokens=12, eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        x = torch.tensor([ids])
        expected = reference.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                      eos_token_id=tok.stop_token_ids)[0, len(ids):].tolist()
    assert answer[0] == expected and len(expected) >= 3
    assert isinstance(tok.decode(answer[0]), str)


def test_yaml_keys_are_checked_with_the_directory_not_with_defaults(hf_dir):
    """A YAML giving Llama 3.1's scaling_factor mapping but not extend_method: valid once config.json gives
    LLAMA3, so config loading leaves the model rules to the merge; without a directory it is an error."""
    scaling = {k: v for k, v in directory_model_config(hf_dir[0])["scaling_factor"].items()}
    overrides = {"model.model_config.scaling_factor": scaling, "model.model_config.pet_config": None}
    cfg = load_config(CONFIG, {"pretrained_model_dir": hf_dir[0], **overrides}, check_files=False)
    assert apply_pretrained_dir(cfg, gpu=False).model.model_config["extend_method"] == "LLAMA3"
    with pytest.raises(ConfigError, match="a mapping is for extend_method LLAMA3"):
        load_config(CONFIG, overrides, check_files=False)
