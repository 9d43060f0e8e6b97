"""An mftune checkpoint holding LoRA weights is applied with the pet_config its header records
(mftune.checkpoint.recorded_pet): its lora_rank, lora_alpha and selected layers win over the run's, each
difference a warning; training settings stay the run's; a checkpoint without LoRA tensors changes nothing.
Logits: the LoRA model saved by tests/lora_checkpoint.py (r 4, alpha 8, wq|wv), rebuilt from the file under a
run pet_config that says otherwise, gives the saved model's logits."""
from __future__ import annotations

import logging

import torch

from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.recorded_pet import checkpoint_pet_config
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

import lora_checkpoint

RUN = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ".*wq|.*wk|.*wv"}


def _saved_and_meta_model(tmp_path):
    """tests/lora_checkpoint.py's base and LoRA checkpoint, and a plain model on meta to select layers on."""
    saved = lora_checkpoint.build(tmp_path)
    with torch.device("meta"):
        return saved, LlamaForCausalLM(dict(lora_checkpoint.TINY))


def test_the_recorded_values_win_with_a_warning_each_and_give_the_saved_logits(tmp_path, caplog):
    saved, meta = _saved_and_meta_model(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mftune"):
        pet = checkpoint_pet_config(RUN, saved.lora_path, meta, "predict")
    assert (pet["lora_rank"], pet["lora_alpha"], pet["target_modules"]) == (4, 8, ".*wq|.*wv")
    assert pet["lora_dropout"] == 0.0  # a training setting: the run's
    text = caplog.text
    assert f"pet_config.lora_alpha=32 (YAML) is replaced by lora_alpha=8, which load_checkpoint={saved.lora_path}" \
        in text and "lora_rank=" not in text  # the same rank: nothing said
    assert "is replaced by the checkpoint's target_modules='.*wq|.*wv'" in text and "instead of 6" in text
    model = LlamaForCausalLM(dict(lora_checkpoint.TINY)).eval()
    get_pet_model(model, pet)
    load_checkpoint(model, saved.lora_path)
    with torch.no_grad():
        torch.testing.assert_close(model(saved.x), saved.lora_logits, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_without_lora_tensors_or_pet_config_leaves_the_run_pet_config(tmp_path, caplog):
    saved, meta = _saved_and_meta_model(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mftune"):
        assert checkpoint_pet_config(RUN, saved.base_path, meta, "finetune") is RUN  # a base: no LoRA, no record
        assert checkpoint_pet_config(RUN, saved.lora_path, meta, "finetune",
                                     lora_names=["model.norm_out.weight"]) is RUN  # a record but no LoRA tensors
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    taken = checkpoint_pet_config(None, saved.lora_path, meta, "finetune")  # a run without pet_config takes it
    assert (taken["lora_rank"], taken["lora_alpha"], taken["target_modules"]) == (4, 8, ".*wq|.*wv")
