"""Recompute gives the same gradients; tied embeddings save once and load back."""
import pytest
import torch

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import load_checkpoint, unique_state_dict
from mftune.models.llama import LlamaForCausalLM
from mftune.parallel.recompute import apply_recompute

TINY = {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 50,
        "multiple_of": 16, "compute_dtype": "float32", "rotary_dtype": "float32"}


def _grads(recompute: bool) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    calls = []
    for layer in model.model.layers:
        layer.attention.register_forward_hook(lambda *_: calls.append(1))
    if recompute:
        assert apply_recompute(model.model.layers) == "full recompute of 2 decoder layer(s) (layers 0-1)"
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    model(ids, ids).backward()
    return {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_recompute_changes_nothing_but_memory():
    # Reference: the same model without activation checkpointing, same weights and batch. With
    # recompute each layer runs its forward again in backward: 2 layers x 2 attention calls.
    (plain, plain_calls), (recomputed, calls) = _grads(False), _grads(True)
    assert (plain_calls, calls) == (2, 4)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0)


def test_tied_embeddings_save_once_and_load(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM({**TINY, "tie_word_embeddings": True})
    state = unique_state_dict(model)
    assert "lm_head.weight" not in state and "model.tok_embeddings.embedding_weight" in state
    path = str(tmp_path / "tied.safetensors")
    save_complete(path, state, model_config=model.config.to_dict())
    torch.manual_seed(1)
    other = LlamaForCausalLM({**TINY, "tie_word_embeddings": True})
    report = load_checkpoint(other, path)
    assert not report["fresh_lora"]
    assert other.lm_head.weight is other.model.tok_embeddings.embedding_weight
    ids = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)


def test_embedding_init_type_sets_the_embedding_dtype_only():
    """MindFormers' embedding_init_type: the embedding table's dtype (default param_init_type)."""
    model = LlamaForCausalLM({**TINY, "embedding_init_type": "bfloat16"})
    assert model.model.tok_embeddings.embedding_weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == model.model.layers[0].attention.wq.weight.dtype == torch.float32
    assert model(torch.randint(0, 50, (1, 8))).dtype == torch.float32
    assert LlamaForCausalLM(TINY).model.tok_embeddings.embedding_weight.dtype == torch.float32
    with pytest.raises(ValueError, match="embedding_init_type='bfloat16' is invalid: with tie_word_embeddings"):
        LlamaForCausalLM({**TINY, "embedding_init_type": "bfloat16", "tie_word_embeddings": True})
