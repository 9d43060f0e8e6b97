"""--load_checkpoint sources: directory of complete files, Hugging Face directory, distributed
rank_*/ directory. Expected values: the tensors that were written (read back bit for bit) and
transformers' logits for the same weights."""
import json
import os

import pytest
import torch
import transformers

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint, load_checkpoint, unique_state_dict
from mftune.errors import CheckpointError
from mftune.checkpoint.names import hf_config_to_model_config
from mftune.checkpoint.formats import open_checkpoint
from mftune.models.llama import LlamaForCausalLM

from tiny_checkpoints import CFG, LORA
from tiny_checkpoints import tiny_model as _model  # the name these tests were written with


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_directory_of_complete_files_loads_base_and_lora_together(tmp_path):
    src = _model(lora=True)
    state = _state(src)
    base = {k: v for k, v in state.items() if "lora" not in k}
    lora = {k: v for k, v in state.items() if "lora" in k}
    save_complete(str(tmp_path / "base.safetensors"), base, model_config=dict(CFG))
    save_complete(str(tmp_path / "lora.safetensors"), lora, model_config=dict(CFG))
    dst = _model(lora=True, seed=1)
    report = load_checkpoint(dst, str(tmp_path))
    assert report["fresh_lora"] == [] and len(report["loaded"]) == len(state)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert fingerprint(str(tmp_path)) != fingerprint(str(tmp_path / "base.safetensors"))
    # the base alone: LoRA starts fresh; the LoRA alone: the base is missing, and the fix is named
    os.remove(tmp_path / "lora.safetensors")
    assert len(load_checkpoint(_model(lora=True), str(tmp_path))["fresh_lora"]) == len(lora)
    save_complete(str(tmp_path / "copy.safetensors"), {"lm_head.weight": base["lm_head.weight"]},
                  model_config=dict(CFG))
    with pytest.raises(CheckpointError, match="lm_head.weight is in both"):
        load_checkpoint(_model(), str(tmp_path))


def test_lora_only_file_names_the_fix(tmp_path):
    lora = {k: v for k, v in _state(_model(lora=True)).items() if "lora" in k}
    save_complete(str(tmp_path / "lora.safetensors"), lora, model_config=dict(CFG))
    with pytest.raises(CheckpointError, match="put both files in one directory"):
        load_checkpoint(_model(lora=True), str(tmp_path / "lora.safetensors"))


def test_empty_or_foreign_directory_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="no checkpoint mftune recognises"):
        load_checkpoint(_model(), str(tmp_path))


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "bin"])
def test_hugging_face_directory_loads_on_the_fly(tmp_path, kind):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=16, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=kind != "bin",
                       max_shard_size="20KB" if kind != "safetensors" else "5GB")
    files = sorted(os.listdir(tmp_path))
    assert any("index" in f for f in files) == (kind != "safetensors"), files
    model_config = hf_config_to_model_config(json.loads((tmp_path / "config.json").read_text()))
    model_config.update(compute_dtype="float32", param_init_type="float32")  # compare in fp32
    model = LlamaForCausalLM(model_config).eval()
    load_checkpoint(model, str(tmp_path))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == files  # nothing written


def _split(t: torch.Tensor, parts: int, dim: int) -> list[tuple[torch.Tensor, list[list[int]]]]:
    """torch.chunk pieces of ``t`` with their index blocks."""
    out, start = [], 0
    for piece in torch.chunk(t, parts, dim):
        block = [[0, n] for n in t.shape]
        block[dim] = [start, start + piece.shape[dim]]
        start += piece.shape[dim]
        out.append((piece, block))
    return out


def test_distributed_directory_is_reassembled_for_any_block(tmp_path):
    """Three "ranks": the embedding split in 3 over rows (uneven), wq over columns, the rest
    replicated; a full-model load and a block read both get the original values."""
    src = _model()
    state = unique_state_dict(src)
    split = {"model.tok_embeddings.embedding_weight": 0, "model.layers.0.attention.wq.weight": 1}
    for rank in range(3):
        tensors, shards = {}, {}
        for name, t in state.items():
            if name in split:
                piece, block = _split(t, 3, split[name])[rank]
                tensors[name] = piece.clone()
                shards[name] = {"global_shape": list(t.shape), "block": block}
            else:
                tensors[name] = t
        rank_dir = tmp_path / f"rank_{rank}"
        save_complete(str(rank_dir / f"ckpt_rank_{rank}-1_1.safetensors"), tensors, model_config=dict(CFG),
                      extra_metadata={"shards": {"rank": rank, "tensors": shards}})
        (rank_dir / "meta.json").write_text(json.dumps({"last_ckpt_file": f"ckpt_rank_{rank}-1_1.safetensors"}))
    dst = _model(seed=3)
    load_checkpoint(dst, str(tmp_path))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state.get(k, v)), k
    entry = open_checkpoint(str(tmp_path))["model.tok_embeddings.embedding_weight"]
    block = (slice(5, 40), slice(3, 9))  # spans all three row pieces
    assert torch.equal(entry.read(block), state["model.tok_embeddings.embedding_weight"][block])
    # one rank's file alone is refused with the fix; a missing rank is named as incomplete
    with pytest.raises(CheckpointError, match="pass the directory"):
        load_checkpoint(_model(), str(tmp_path / "rank_1" / "ckpt_rank_1-1_1.safetensors"))
    for f in (tmp_path / "rank_2").iterdir():
        f.unlink()
    (tmp_path / "rank_2").rmdir()
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_checkpoint(_model(), str(tmp_path))


def test_truncated_rank_file_is_named(tmp_path):
    """meta.json records the size of the file it marks complete; a file cut short afterwards is
    an error naming it, not a silent partial load."""
    from mftune.trainer.checkpointing import CheckpointMonitor

    model = _model(lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    mon = CheckpointMonitor(str(tmp_path), "llama")
    path = mon.save(model, opt, epoch=1, step_in_epoch=1, global_step=1, loss_scale=1.0, global_batch_size=1,
                    model_config=dict(CFG), extra_metadata={})
    assert len(open_checkpoint(str(tmp_path / "checkpoint"))) > 0
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        open_checkpoint(str(tmp_path / "checkpoint"))


def test_peft_adapter_directory_with_its_base_beside_it(tmp_path):
    """An exported PEFT adapter, with the base file copied into its directory, loads as the LoRA
    model it came from."""
    import shutil

    from mftune.checkpoint.export import export_peft_adapter

    src = _model(lora=True)
    state = _state(src)
    base = {k: v for k, v in state.items() if "lora" not in k}
    save_complete(str(tmp_path / "base.safetensors"), base, model_config=dict(CFG))
    lora = {k: v for k, v in state.items() if "lora" in k}
    save_complete(str(tmp_path / "lora.safetensors"), lora, model_config=dict(CFG, pet_config=LORA),
                  extra_metadata={"pet_config": LORA})
    export_peft_adapter(str(tmp_path / "lora.safetensors"), str(tmp_path / "adapter"))
    shutil.copy(tmp_path / "base.safetensors", tmp_path / "adapter" / "base.safetensors")
    dst = _model(lora=True, seed=5)
    report = load_checkpoint(dst, str(tmp_path / "adapter"))
    assert report["fresh_lora"] == []
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_read_block_reads_exactly_the_block(tmp_path):
    """Row ranges, column ranges (one read per row), 3-D blocks, scalars and empty blocks against
    plain slicing; a file cut short is an error naming it."""
    from safetensors.torch import save_file

    from mftune.checkpoint.safetensors_io import read_block

    path = str(tmp_path / "t.safetensors")
    t = {"m": torch.randn(37, 53), "c": torch.randn(4, 5, 6).to(torch.bfloat16), "s": torch.tensor(3.0)}
    save_file(t, path)
    for block in [(slice(3, 20), slice(0, 53)), (slice(3, 20), slice(7, 40)), (slice(36, 37), slice(52, 53)),
                  (slice(0, 0), slice(0, 5))]:
        assert torch.equal(read_block(path, "m", block), t["m"][block]), block
    for block in [(slice(1, 3), slice(0, 5), slice(2, 4)), (slice(0, 4), slice(1, 2), slice(0, 6))]:
        got = read_block(path, "c", block)
        assert got.dtype == torch.bfloat16 and torch.equal(got, t["c"][block]), block
    assert torch.equal(read_block(path, "s", ()), t["s"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_block(path, "m", (slice(0, 37), slice(0, 53)))


def test_lora_checkpoint_brings_its_recorded_base(tmp_path):
    """A LoRA run's checkpoint (adapters plus a trained norm, as with freeze_exclude) whose header
    records its base: the base is loaded first, the checkpoint's tensors over it. A model without
    those adapters refuses it instead of dropping them."""
    src = _model(lora=True)
    state = _state(src)
    base_path = str(tmp_path / "base.safetensors")
    save_complete(base_path, {k: v for k, v in state.items() if "lora" not in k}, model_config=dict(CFG))
    trained = {k: v for k, v in state.items() if "lora" in k}
    trained["model.norm_out.weight"] = torch.full_like(state["model.norm_out.weight"], 0.5)
    ckpt = str(tmp_path / "run" / "lora.safetensors")
    save_complete(ckpt, trained, model_config=dict(CFG),
                  extra_metadata={"base_checkpoint": {"path": base_path, "fingerprint": fingerprint(base_path)}})
    dst = _model(lora=True, seed=1)
    report = load_checkpoint(dst, ckpt)
    assert report["base"]["path"] == os.path.abspath(base_path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, trained.get(k, state[k])), k
    with pytest.raises(CheckpointError, match="LoRA adapters this model does not have"):
        load_checkpoint(_model(), ckpt)


def test_one_recognition_gives_both_the_tensors_and_the_header(tmp_path):
    """A directory's format is decided once (``formats.recognise``), and both its tensors and its header
    come from that format. Expected: a folder holding a LoRA checkpoint and a stray config.json (no
    Hugging Face weights) is a directory of complete files, so its header is the file's (the recorded
    base, loaded first), not config.json translated; with Hugging Face weights beside config.json it is a
    Hugging Face directory, and config.json gives the header."""
    import json

    from mftune.checkpoint.formats import checkpoint_header, file_dir, huggingface, recognise

    src = _model(lora=True)
    state = _state(src)
    base_path = str(tmp_path / "base.safetensors")
    save_complete(base_path, {k: v for k, v in state.items() if "lora" not in k}, model_config=dict(CFG))
    run = tmp_path / "run"
    save_complete(str(run / "lora.safetensors"), {k: v for k, v in state.items() if "lora" in k},
                  model_config=dict(CFG), extra_metadata={"base_checkpoint": {"path": base_path,
                                                                              "fingerprint": fingerprint(base_path)}})
    (run / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                                                 "num_hidden_layers": 2, "vocab_size": 64}))
    assert recognise(str(run)) is file_dir
    assert checkpoint_header(str(run))["base_checkpoint"]["path"] == base_path
    dst = _model(lora=True, seed=1)
    assert load_checkpoint(dst, str(run))["base"]["path"] == os.path.abspath(base_path)
    assert all(torch.equal(v, state[k]) for k, v in dst.state_dict().items())

    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16)).save_pretrained(hf)
    assert recognise(str(hf)) is huggingface
    assert checkpoint_header(str(hf))["model_config"]["hidden_size"] == 32
