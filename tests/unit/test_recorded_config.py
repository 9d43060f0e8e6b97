"""A checkpoint that records its architecture (a Hugging Face config.json, an mftune header) refuses a
model_config that disagrees with it, naming the key and both values: a wrong RoPE base, scaling, tie or
head count would otherwise run without a shape error and give quietly wrong results."""
import pytest

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import unique_state_dict
from mftune.checkpoint.names import hf_config_to_model_config
from mftune.checkpoint.recorded_config import check_recorded_architecture
from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM
from tiny_hf import hf_model


def _run_config(hf, **changes) -> LlamaConfig:
    return LlamaConfig(**{**hf_config_to_model_config(hf.config.to_dict()), **changes})


def test_hugging_face_config_json_is_checked(tmp_path):
    hf = hf_model(rope_theta=100000.0, tie=True)
    hf.save_pretrained(tmp_path)
    check_recorded_architecture(str(tmp_path), _run_config(hf, seq_length=16, compute_dtype="float16"))  # ok
    with pytest.raises(CheckpointError) as info:
        check_recorded_architecture(str(tmp_path), _run_config(hf, theta=10000.0, tie_word_embeddings=False,
                                                               n_kv_heads=4))
    text = str(info.value)
    assert f"load_checkpoint={tmp_path} records another architecture than model.model_config (its config.json)" in text
    for line in ("model.model_config.n_kv_heads=4 is invalid: the checkpoint has n_kv_heads=2. Set n_kv_heads: 2.",
                 "model.model_config.theta=10000.0 is invalid: the checkpoint has theta=100000.0.",
                 "model.model_config.tie_word_embeddings=False is invalid: the checkpoint has "
                 "tie_word_embeddings=True."):
        assert line in text


def test_llama3_rope_scaling_and_header_configs_are_checked(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = hf_model(rope_scaling=scaling)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="model.model_config.extend_method='None' is invalid: the checkpoint "
                                              "has extend_method='LLAMA3'"):
        check_recorded_architecture(str(tmp_path / "hf"), _run_config(hf, extend_method="None", scaling_factor=1.0))
    model = LlamaForCausalLM({"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 64,
                              "intermediate_size": 48, "compute_dtype": "float32"})
    path = str(tmp_path / "m.safetensors")
    save_complete(path, unique_state_dict(model), model_config=model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"\(its header\):\n  model.model_config.intermediate_size=96 is "
                                              r"invalid: the checkpoint has intermediate_size=48"):
        check_recorded_architecture(path, LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 96}))
