"""HF <-> mftune weight conversion (mftune.checkpoint.convert, scripts/convert_weight.py).

The reference is transformers itself: its ``save_pretrained`` writes the inputs and its
``from_pretrained`` reads our reversed output; tensors must come back bit-identical, and the converted
mftune file must give transformers' logits. transformers 5 writes safetensors only (it ignores
``safe_serialization=False``), so the ``.bin`` inputs are written in transformers 4's layout (tests/tiny_hf.py):
``torch.save`` state dict shards named ``pytorch_model-0000i-of-0000N.bin`` plus
``pytorch_model.bin.index.json``.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open

import tiny_hf
from tiny_hf import CASES, VOCAB

from mftune import LlamaConfig, LlamaForCausalLM
from mftune.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_complete
from mftune.checkpoint.convert import convert_hf_to_mftune, convert_mftune_to_hf, parse_size
from mftune.checkpoint.formats.huggingface import iter_hf_tensors
from mftune.checkpoint.safetensors_io import write_safetensors_streaming

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each case's transformers model and its saved directory (written once per module)."""
    return tiny_hf.hf_dirs(tmp_path_factory.mktemp, CASES)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical_and_logits_match(hf_dirs, tmp_path, case):
    hf, directory = hf_dirs[case]
    files = sorted(os.listdir(directory))
    if case == "sharded_safetensors":
        assert "model.safetensors.index.json" in files and "model-00002-of-00004.safetensors" in files, files
    if case == "bin_sharded":
        assert "pytorch_model-00003-of-00003.bin" in files, files
    ckpt = str(tmp_path / "llama.safetensors")
    report = convert_hf_to_mftune(directory, ckpt)
    meta = read_metadata(ckpt)
    assert meta["source"]["format"] == "huggingface" and report["tensors"] == len(safe_open(ckpt, "pt").keys())

    # The converted file loads into mftune's model and gives transformers' logits. compute_dtype is not
    # part of config.json (mftune's default is MindFormers' float16); fp32 compute makes the comparison tight.
    ours = LlamaForCausalLM(LlamaConfig.from_dict({**meta["model_config"], "compute_dtype": "float32"}))
    load_checkpoint(ours, ckpt)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits, atol=1e-5, rtol=1e-5)

    # Reversed, with shards small enough to need several: transformers reads the same tensors back.
    out = str(tmp_path / "hf")
    convert_mftune_to_hf(ckpt, out, max_shard_size="100KB")
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    ref, got = hf.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if hf.config.tie_word_embeddings:  # written once, as transformers does; tied again on load
        weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
        assert "lm_head.weight" not in weight_map
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_reversed_sharding_matches_transformers_index_format(hf_dirs, tmp_path):
    _, directory = hf_dirs["single_safetensors_gqa"]
    ckpt, out = str(tmp_path / "a.safetensors"), str(tmp_path / "hf")
    convert_hf_to_mftune(directory, ckpt)
    report = convert_mftune_to_hf(ckpt, out, max_shard_size=60_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total, seen = 0, {}
    for shard in shards:
        size = os.path.getsize(os.path.join(out, shard))
        with safe_open(os.path.join(out, shard), "pt") as f:
            assert f.metadata().keys() == {"format", "mftune_checksums"} and f.metadata()["format"] == "pt"
            for name in f.keys():
                seen[name] = shard
                nbytes = f.get_tensor(name).numel() * 4
                total += nbytes
                assert nbytes > 60_000 or size < 60_000 + 4096, shard  # only an oversized tensor passes the limit
    assert index["weight_map"] == seen and index["metadata"]["total_size"] == total == report["bytes"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config.get("torch_dtype", config.get("dtype")) == "float32" and config["num_key_value_heads"] == 2

    # Re-saved as one file into the same directory: the stale shards and index are removed.
    convert_mftune_to_hf(ckpt, out)
    assert sorted(f for f in os.listdir(out) if "model" in f) == ["model.safetensors"]  # + the base's files


def test_dtype_bf16_forward_and_reverse(hf_dirs, tmp_path):
    hf, directory = hf_dirs["sharded_safetensors"]
    ckpt = str(tmp_path / "bf16.safetensors")
    convert_hf_to_mftune(directory, ckpt, dtype="bf16")
    assert read_metadata(ckpt)["model_config"]["param_init_type"] == "bfloat16"
    with safe_open(ckpt, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        emb = f.get_tensor("model.tok_embeddings.embedding_weight")
    assert torch.equal(emb, hf.model.embed_tokens.weight.to(torch.bfloat16))
    out = str(tmp_path / "hf16")
    convert_mftune_to_hf(ckpt, out, dtype="fp16")
    config = json.load(open(os.path.join(out, "config.json")))  # the base's: transformers 5 spells it dtype
    assert config.get("torch_dtype", config.get("dtype")) == "float16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_missing_shard_file_is_named(hf_dirs, tmp_path):
    _, directory = hf_dirs["sharded_safetensors"]
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    os.remove(broken / "model-00003-of-00004.safetensors")
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        convert_hf_to_mftune(str(broken), str(tmp_path / "out.safetensors"))
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        list(iter_hf_tensors(str(broken)))
    assert not (tmp_path / "out.safetensors").exists()


def test_input_path_may_be_a_file_and_bad_inputs_are_clear(hf_dirs, tmp_path):
    hf, directory = hf_dirs["single_safetensors_gqa"]
    ckpt = str(tmp_path / "a.safetensors")
    convert_hf_to_mftune(os.path.join(directory, "model.safetensors"), ckpt)  # MindFormers users pass a file
    assert read_metadata(ckpt)["model_config"]["n_kv_heads"] == 2
    names = [n for n, _ in iter_hf_tensors(directory)]
    assert sorted(names) == sorted(hf.state_dict())
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_hf_to_mftune(str(tmp_path / "nope"), ckpt)
    with pytest.raises(CheckpointError, match="needs config.json"):
        convert_hf_to_mftune(str(tmp_path), ckpt)  # a directory without a model
    with pytest.raises(CheckpointError, match="output_path="):
        convert_hf_to_mftune(directory, os.path.join(directory, "model.safetensors"))
    with pytest.raises(CheckpointError, match="output_path="):  # the input's own folder: refused
        convert_mftune_to_hf(ckpt, str(tmp_path))
    with pytest.raises(CheckpointError, match="max_shard_size=5XB is invalid"):
        convert_mftune_to_hf(ckpt, str(tmp_path / "hf"), max_shard_size="5XB")
    assert (parse_size("5GB"), parse_size("2GiB"), parse_size(1000), parse_size("500mb")) == \
        (5 * 10**9, 2 * 2**30, 1000, 5 * 10**8)
    # A file without mftune's header (here: transformers' own) is refused by the reverse direction.
    with pytest.raises(CheckpointError, match="not a complete mftune checkpoint"):
        convert_mftune_to_hf(os.path.join(directory, "model.safetensors"), str(tmp_path / "hf"))


def test_reversed_skips_training_state_and_lora(hf_dirs, tmp_path, caplog):
    """A training checkpoint (optimizer moments, counters, LoRA tensors) reverses to the base weights."""
    hf, directory = hf_dirs["tied_safetensors"]
    ckpt = str(tmp_path / "a.safetensors")
    convert_hf_to_mftune(directory, ckpt)
    with safe_open(ckpt, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert "lm_head.weight" not in sd  # tied: stored once, under the embedding's name
    mc = read_metadata(ckpt)["model_config"]
    extra = {"adam_m.model.norm_out.weight": torch.ones(64), "adam_v.model.norm_out.weight": torch.ones(64),
             "epoch_num": torch.tensor(1), "global_step": torch.tensor(7),
             "model.layers.0.attention.wq.mindpet_delta_lora_a": torch.zeros(4, 64),
             "model.layers.0.attention.wq.mindpet_delta_lora_b": torch.zeros(64, 4)}
    train = str(tmp_path / "train.safetensors")
    save_complete(train, {**sd, **extra}, model_config=mc)
    out = str(tmp_path / "hf")
    with caplog.at_level("INFO", logger="mftune"):
        report = convert_mftune_to_hf(train, out)
    assert sorted(report["skipped"].values()) == [2, 2, 2]
    assert "merge it first with scripts/transform_ckpt_lora.py" in caplog.text
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())

    with pytest.raises(CheckpointError, match="model.layers.0.attention.wq.weight"):  # an adapter-only file
        save_complete(train, extra, model_config=mc)
        convert_mftune_to_hf(train, str(tmp_path / "hf2"))


def test_streaming_writer_layout_and_one_tensor_at_a_time(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
               "d": torch.tensor([True, False, True]), "e": torch.tensor(2.5, dtype=torch.float16),
               "f": torch.empty(0, 4)}
    refs: list[weakref.ref] = []

    def produce():
        for name, tensor in tensors.items():
            gc.collect()
            assert sum(r() is not None for r in refs) <= 1, "the writer holds more than the last tensor"
            copy = tensor.clone()
            refs.append(weakref.ref(copy))
            yield name, copy

    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = str(tmp_path / "s.safetensors")
    size = write_safetensors_streaming(path, specs, produce(), {"format": "pt", "k": "v"})
    assert size == sum(v.numel() * v.element_size() for v in tensors.values())
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert header_len % 8 == 0 and os.path.getsize(path) == 8 + header_len + size
    with safe_open(path, "pt") as f:
        assert f.metadata().keys() == {"format", "k", "mftune_checksums"} and list(f.keys()) == sorted(tensors)
        assert f.metadata()["format"] == "pt" and f.metadata()["k"] == "v"
        for k, v in tensors.items():
            assert f.get_tensor(k).dtype == v.dtype and torch.equal(f.get_tensor(k), v), k
    with pytest.raises(CheckpointError, match="expected tensor"):
        write_safetensors_streaming(path, specs, iter([("a", tensors["a"])]))
    with safe_open(path, "pt") as f:  # the failed write left the earlier file intact
        assert f.metadata()["k"] == "v"
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
