"""A MindFormers qkv_concat checkpoint (fused w_qkv / w_gate_hidden, as its convert_weight.py writes them)
loads into mftune's separate wq/wk/wv and w1/w3 with identical logits."""
import pytest
import torch

from mftune.checkpoint.formats import open_checkpoint
from mftune.checkpoint.load import load_checkpoint, unique_state_dict
from mftune.checkpoint.safetensors_io import save_safetensors
from mftune.errors import CheckpointError
from mftune.models.llama import LlamaForCausalLM

TINY = {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "vocab_size": 50,
        "multiple_of": 16, "compute_dtype": "float32", "rotary_dtype": "float32"}


def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MindFormers' convert_qkv_concat_weight: cat((wq, wk, wv), 0) and cat((w1, w3), 0) per layer."""
    out = dict(state)
    for i in range(TINY["num_layers"]):
        p = f"model.layers.{i}."
        out[p + "attention.w_qkv.weight"] = torch.cat([out.pop(p + f"attention.{w}.weight") for w in ("wq", "wk", "wv")])
        out[p + "feed_forward.w_gate_hidden.weight"] = torch.cat([out.pop(p + f"feed_forward.{w}.weight")
                                                                  for w in ("w1", "w3")])
    return out


def test_fused_checkpoint_loads_split(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    path = str(tmp_path / "fused.safetensors")
    save_safetensors(fuse(unique_state_dict(model)), path, {})
    entries = open_checkpoint(path)
    assert entries["model.layers.1.attention.wk.weight"].shape == (16, 32)  # GQA: kv rows = 2 heads x 8
    block = (slice(2, 5), slice(3, 9))  # a block inside wv reads the fused rows 32 + 16 + 2 ... 32 + 16 + 5
    torch.testing.assert_close(entries["model.layers.0.attention.wv.weight"].read(block),
                               model.model.layers[0].attention.wv.weight[block], rtol=0, atol=0)
    torch.manual_seed(1)
    other = LlamaForCausalLM(TINY)
    load_checkpoint(other, path)
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)


def test_fused_and_separate_together_or_fused_lora_are_errors(tmp_path):
    model = LlamaForCausalLM(TINY)
    state = unique_state_dict(model)
    both = {**fuse(state), "model.layers.0.attention.wq.weight": state["model.layers.0.attention.wq.weight"]}
    save_safetensors(both, str(tmp_path / "both.safetensors"), {})
    with pytest.raises(CheckpointError, match="holds both model.layers.0.attention.w_qkv.weight and "
                                              "model.layers.0.attention.wq.weight"):
        open_checkpoint(str(tmp_path / "both.safetensors"))
    lora = {**fuse(state), "model.layers.0.attention.w_qkv.mindpet_delta_lora_a": torch.zeros(2, 32)}
    save_safetensors(lora, str(tmp_path / "lora.safetensors"), {})
    with pytest.raises(CheckpointError, match="fused projection"):
        open_checkpoint(str(tmp_path / "lora.safetensors"))
