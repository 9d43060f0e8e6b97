"""The YAMLs MindFormers v1.3.0 ships for Llama 2, Llama 3 and Llama 3.1 validate unchanged (only their
placeholder paths replaced by real files); the schema accepts every key MindFormers' code accepts."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest

from mftune.config import schema
from mftune.config.load import load_config
from mftune.errors import ConfigError
from mftune.models.config import LlamaConfig
from mftune.parallel.mesh import ParallelContext
from mftune.trainer.build import build_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mindformers"
YAMLS = sorted(str(p.relative_to(FIXTURES / "v1.3.0")) for p in (FIXTURES / "v1.3.0").rglob("*.yaml"))
QUANTIZED = {"predict_llama2_13b_ptq.yaml", "predict_llama2_13b_rtn.yaml", "predict_llama2_13b_smooth_quant.yaml",
             "predict_llama2_70b_rtn.yaml", "predict_llama2_70b_smooth_quant.yaml"}
# MindFormers' own typo `use_parallel: Flase` (a string, which MindFormers reads as True)
FLASE = ["use_parallel='Flase' is invalid: expected a bool (True or False), got a string. Set use_parallel to a bool "
         "(True or False)."]


def test_every_shipped_yaml_is_here():
    assert len(YAMLS) == 41
    assert {os.path.dirname(y) for y in YAMLS} == {"configs/llama2", "research/llama3", "research/llama3_1"}


def _placeholders(path: Path, tmp_path: Path) -> dict[str, str]:
    """Real files for the YAML's placeholder paths ('{path}/llama2_7b.ckpt', '/path/tokenizer.model', '')."""
    data, vocab, ckpt = tmp_path / "data", tmp_path / "tokenizer.model", tmp_path / "base.ckpt"
    data.mkdir(exist_ok=True)
    vocab.write_bytes(b"")
    ckpt.write_bytes(b"")
    text = path.read_text()
    out = {"train_dataset.data_loader.dataset_dir": str(data), "eval_dataset.data_loader.dataset_dir": str(data)}
    if "load_checkpoint: '{path}" in text or "load_checkpoint: '/llama" in text:
        out["load_checkpoint"] = str(ckpt)
    if "vocab_file: \"/path" in text:
        out["processor.tokenizer.vocab_file"] = str(vocab)
    return out


@pytest.mark.parametrize("name", YAMLS)
def test_mindformers_yaml_validates(name, tmp_path, caplog):
    path = FIXTURES / "v1.3.0" / name
    overrides = _placeholders(path, tmp_path)
    base = os.path.basename(name)
    if base in QUANTIZED:
        with pytest.raises(ConfigError) as info:
            load_config(str(path), overrides)
        (message,) = info.value.errors
        assert message.startswith("model.model_config.quantization_config=") and "quantized inference" in message
        assert "Remove quantization_config and use model.arch.type: LlamaForCausalLM" in message
        return
    if base == "predict_llama2_7b_slora.yaml":  # its placeholder adapter_path "" names the key to fill
        with pytest.raises(ConfigError) as info:
            load_config(str(path), overrides)
        assert [e.split(" is invalid")[0] for e in info.value.errors] == [
            "model.model_config.pet_config.adapter_path=''"]
        overrides["model.model_config.pet_config.adapter_path"] = str(tmp_path / "adapters.json")
    if base == "predict_llama2_7b_ptuning2.yaml":  # valid but for MindFormers' typo
        with pytest.raises(ConfigError) as info:
            load_config(str(path), overrides)
        assert info.value.errors == FLASE
        overrides["use_parallel"] = "False"
    with caplog.at_level(logging.INFO, logger="mftune"):
        cfg = load_config(str(path), overrides)
    assert cfg.model.model_config["num_layers"] >= 32
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignored on this backend")]
    assert len(ignored) <= 1 and all(len(line) < 250 for line in ignored)


def test_lora_13b_in_run_mode_train_keeps_its_pet_config():
    cfg = load_config(str(FIXTURES / "v1.3.0/configs/llama2/lora_llama2_13b.yaml"), check_files=False)
    assert cfg.run_mode == "train" and cfg.model.model_config["pet_config"]["pet_type"] == "lora"


def test_pipeline_yaml_runs_as_data_parallel():
    cfg = load_config(str(FIXTURES / "v1.3.0/configs/llama2/finetune_llama2_70b.yaml"), check_files=False)
    pc, raw = cfg.parallel_config, (FIXTURES / "v1.3.0/configs/llama2/finetune_llama2_70b.yaml").read_text()
    assert "pipeline_stage: 8" in raw and pc.pipeline_stage == 1
    assert (pc.data_parallel, pc.model_parallel) == (16, 4)  # the same 64 processes (dp 2 x mp 4 x pp 8)
    # MindFormers' global batch: batch_size 1 x data_parallel 2 x micro_batch_num 128
    assert cfg.runner_config.gradient_accumulation_steps * pc.data_parallel * cfg.runner_config.batch_size == 256


# Arguments MindFormers' trainer passes to these classes itself (never YAML keys) and keys of non-LLM tasks.
NOT_YAML_KEYS = {
    "runner_wrapper": {"network", "optimizer"},
    "optimizer": {"params"},
    "callbacks.CheckpointMonitor": {"config"},
    "runner_config": {"image_size", "num_classes"},
    "train_dataset": {"image_size"},
    "train_dataset.data_loader": {"class_indexing", "decode", "decrypt", "extensions", "language_pair", "task",
                                  "test_set", "usage", "valid_set"},
    "context": {"auto_tune_mode", "check_bprop", "deterministic", "enable_auto_mixed_precision", "enable_dump",
                "enable_profiling", "enable_reduce_precision", "enable_sparse", "env_config_path", "grad_for_scalar",
                "load_compile_cache", "precompile_only", "print_file_path", "profiling_options",
                "pynative_synchronize", "reserve_class_name_in_scope", "save_compile_cache", "save_dump_path",
                "variable_memory_max_size"},
}


def _fields(section: str) -> set[str]:
    """The keys mftune's schema accepts in a YAML section (``context`` is a free mapping: every key)."""
    if section == "model.model_config":
        return {f.name for f in dataclasses.fields(LlamaConfig)}
    if section.startswith("callbacks."):
        return set(schema.CALLBACK_KEYS[section.split(".")[1]])
    cls = schema.MFConfig
    for part in section.split("."):
        found = schema.section_type(cls, part)
        cls = found[1] if isinstance(found, tuple) else found
    return {f.name for f in dataclasses.fields(cls)} if cls else set()


def test_schema_accepts_every_key_mindformers_code_accepts():
    sections = json.loads((FIXTURES / "keys.json").read_text())["sections"]
    missing = {}
    for section, keys in sections.items():
        if section == "context":
            assert schema.section_type(schema.MFConfig, "context") is None  # a free mapping: any key
            continue
        lacking = set(keys) - _fields(section) - NOT_YAML_KEYS.get(section, set())
        if lacking:
            missing[section] = sorted(lacking)
    assert not missing, missing


def test_lora_13b_run_mode_train_trains_only_the_adapters(tmp_path):
    """MindFormers' build_network applies pet_config whatever the run mode: so does mftune (run_mode
    train, the 13B LoRA file's own, shrunk to a tiny shape)."""
    tiny = {"model.model_config." + k: v for k, v in {"hidden_size": 32, "num_layers": 2, "num_heads": 4,
            "vocab_size": 64, "seq_length": 16, "multiple_of": 16, "compute_dtype": "float32",
            "param_init_type": "float32"}.items()}
    cfg = load_config(str(FIXTURES / "v1.3.0/configs/llama2/lora_llama2_13b.yaml"),
                      {**tiny, "use_parallel": False, "output_dir": str(tmp_path)}, check_files=False)
    built = build_model(cfg, LlamaConfig.from_dict(cfg.model.model_config), ParallelContext())
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all("mindpet_delta_lora" in n for n in trainable)
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"wq", "wv"}  # the file's target_modules
