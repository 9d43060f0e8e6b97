"""MindSpore .ckpt checkpoints and strategy files, read and written without MindSpore.

Expected values: bytes encoded by hand in this file following MindSpore's ``checkpoint.proto`` and
``node_strategy.proto`` (independent of mftune's writer); the per-rank blocks in ``LAYOUTS`` are the
slices MindSpore 2.7's ``transform_checkpoints`` wrote for these strategies (tests/e2e/test_mindspore_ckpt_runs.py
checks the same against MindSpore itself).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mftune.checkpoint.formats import distributed, mindspore_ckpt, mindspore_ranks, open_checkpoint, recognise
from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.mindspore import ckpt as ckpt_io
from mftune.checkpoint.mindspore.ckpt import ckpt_index, read_block, string_value, write_ckpt_streaming
from mftune.checkpoint.mindspore.strategy import load_strategy
from mftune.errors import CheckpointError
from mftune.trainer.resume import find_resume_point


# ----------------------------------------------------------------------------------------------
# a hand encoder
# ----------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def fld(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def num(number: int, value: int) -> bytes:  # a varint field
    return varint(number << 3) + varint(value)


def value(tag: str, type_name: str, dims, content: bytes, packed: bool = False, tag_last: bool = False) -> bytes:
    """One ``Checkpoint`` holding one ``Value`` (what MindSpore writes per call)."""
    dim_bytes = fld(1, b"".join(varint(d) for d in dims)) if packed and dims else b"".join(num(1, d) for d in dims)
    tensor = dim_bytes + fld(2, type_name.encode()) + fld(3, content)
    parts = [fld(1, tag.encode()), fld(2, tensor)]
    return fld(1, b"".join(parts[::-1] if tag_last else parts))


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def save_raw(path, tensors: dict[str, torch.Tensor]) -> str:
    """A .ckpt of whole tensors (MindSpore's dtype names), encoded by hand."""
    names = {torch.float32: "Float32", torch.bfloat16: "BFloat16", torch.float16: "Float16", torch.int64: "Int64",
             torch.int32: "Int32", torch.bool: "Bool"}
    with open(path, "wb") as f:
        for tag, t in tensors.items():
            f.write(value(tag, names[t.dtype], t.shape, raw(t)))
    return str(path)


# ----------------------------------------------------------------------------------------------
# one file
# ----------------------------------------------------------------------------------------------

def test_reads_a_hand_encoded_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 3, generator=g)
    b16 = torch.randn(4, 5, generator=g).bfloat16()
    half = torch.randn(3, generator=g).half()
    blob = b"".join([
        # a split tensor: np.array_split's uneven rows (4, 4, 2), as MindSpore's async save writes it
        *(value("model.w", "Float32", [10, 3], raw(part)) for part in torch.tensor_split(w, [4, 8])),
        # bf16 split at an odd byte (MindSpore's 512 MiB runs do not respect rows), dims packed
        value("model.b16", "BFloat16", [4, 5], raw(b16)[:7], packed=True),
        value("model.b16", "BFloat16", [4, 5], raw(b16)[7:], packed=True),
        value("half", "Float16", [3], raw(half), tag_last=True),  # fields in another order
        value("model.wq.tk_delta_lora_a", "Float16", [3], raw(half)),  # old MindPet name
        value("epoch_num", "Int64", [], raw(torch.tensor(2))), value("step_num", "Int64", [], raw(torch.tensor(10))),
        value("global_step", "Int32", [1], raw(torch.tensor([9], dtype=torch.int32))),
        value("loss_scale", "Float32", [], raw(torch.tensor(512.0))),
        value("scale_sense", "Float32", [], raw(torch.tensor(1024.0))),
        value("current_iterator_step", "Int32", [], raw(torch.tensor(11, dtype=torch.int32))),
        value("last_overflow_iterator_step", "Int32", [], raw(torch.tensor(7, dtype=torch.int32))),
        value("learning_rate", "Float32", [], raw(torch.tensor(0.1))),
        value("note", "str", [0], "hello".encode("utf-32-le")),
    ])
    path = tmp_path / "a.ckpt"
    path.write_bytes(blob)
    index = ckpt_index(str(path))
    assert [len(index.tensors[n].runs) for n in ("model.w", "model.b16", "half")] == [3, 2, 1]
    entries = open_checkpoint(str(path))
    assert recognise(str(path)) is mindspore_ckpt
    assert sorted(entries) == ["epoch_num", "global_step", "half", "loss_scale", "loss_scale_good_steps",
                               "model.b16", "model.w", "model.wq.mindpet_delta_lora_a", "optimizer_step"]
    assert torch.equal(entries["model.w"].full(), w) and torch.equal(entries["model.b16"].full(), b16)
    assert entries["model.b16"].dtype == torch.bfloat16 and torch.equal(entries["half"].full(), half)
    assert torch.equal(entries["model.w"].read((slice(3, 9), slice(1, 3))), w[3:9, 1:3])  # across runs
    assert torch.equal(entries["model.b16"].read((slice(1, 3), slice(1, 4))), b16[1:3, 1:4])
    # MindFormers' counters in mftune's names (mftune/checkpoint/mindspore/names.py's table)
    counters = {k: entries[k].full().item() for k in ("epoch_num", "global_step", "optimizer_step", "loss_scale",
                                                      "loss_scale_good_steps")}
    assert counters == {"epoch_num": 2, "global_step": 10, "optimizer_step": 9, "loss_scale": 1024.0,
                        "loss_scale_good_steps": 3}
    assert set(mindspore_ckpt.others(str(path))) == {"learning_rate", "note"}  # readable, not entries
    assert string_value(str(path), "note") == "hello"


def test_writer_round_trip_splits_large_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_io, "RUN_BYTES", 64)  # MindSpore splits at 512 MiB; the same logic at 64 bytes
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, 5, 7, generator=g), "b": torch.randn(6, 9, generator=g).bfloat16(),
               "c": torch.randn(5, generator=g).half(), "n": torch.tensor(7), "f": torch.tensor([True, False])}
    path = str(tmp_path / "w.ckpt")
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    assert write_ckpt_streaming(path, specs, iter(tensors.items())) == sum(v.numel() * v.element_size()
                                                                           for v in tensors.values())
    index = ckpt_index(path)
    assert len(index.tensors["a"].runs) == 7 and len(index.tensors["b"].runs) == 2
    for k, v in tensors.items():
        assert torch.equal(ckpt_io.read_tensor(path, k), v) and index.tensors[k].dtype == v.dtype
    assert torch.equal(read_block(path, "a", (slice(1, 3), slice(2, 4), slice(3, 7))), tensors["a"][1:3, 2:4, 3:7])
    out = torch.empty(2, 9, dtype=torch.bfloat16)
    read_block(path, "b", (slice(2, 4), slice(0, 9)), out)
    assert torch.equal(out, tensors["b"][2:4])
    with pytest.raises(CheckpointError, match="expected tensor"):
        write_ckpt_streaming(str(tmp_path / "x.ckpt"), specs, iter(list(tensors.items())[1:]))
    with pytest.raises(CheckpointError, match="cannot be written"):
        write_ckpt_streaming(str(tmp_path / "y.ckpt"), [("z", torch.complex64, (1,))], iter([]))
    assert not os.path.exists(tmp_path / "x.ckpt")  # atomic: nothing left of a failed write


def test_damaged_and_foreign_files_are_refused_naming_them(tmp_path):
    good = save_raw(tmp_path / "good.ckpt", {"w": torch.ones(4, 4), "v": torch.zeros(8)})
    data = open(good, "rb").read()
    cases = {"truncated.ckpt": data[:-5], "empty.ckpt": b"", "text.ckpt": b"not a checkpoint at all\n",
             "short.ckpt": value("w", "Float32", [4, 4], b"\0" * 60)}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"w": torch.ones(2)}, tmp_path / "torch.ckpt")  # e.g. a Lightning checkpoint
    save_complete(str(tmp_path / "st.ckpt"), {"w": torch.ones(2)}, model_config={})  # safetensors renamed
    for name, why in (("truncated.ckpt", "not a readable MindSpore checkpoint"), ("empty.ckpt", "holds no tensors"),
                      ("text.ckpt", "not a readable"), ("short.ckpt", "damaged"), ("torch.ckpt", "not a readable"),
                      ("st.ckpt", "not a readable")):
        with pytest.raises(CheckpointError, match=why) as exc:
            open_checkpoint(str(tmp_path / name))
        assert str(tmp_path / name) in str(exc.value)
    (tmp_path / "crc.ckpt").write_bytes(data + b"crc_num" + (1234).to_bytes(10, "big"))  # crc_check=True
    assert ckpt_index(str(tmp_path / "crc.ckpt")).crc and torch.equal(
        open_checkpoint(str(tmp_path / "crc.ckpt"))["w"].full(), torch.ones(4, 4))


# ----------------------------------------------------------------------------------------------
# strategies and rank sets
# ----------------------------------------------------------------------------------------------

# name -> (global shape, dev_matrix, tensor_map, opt_weight_shard_step, opt_weight_shard_size, blocks of ranks 0..7)
LAYOUTS = {
    "model.layers.0.attention.wq.weight": ((16, 8), [2, 4], [0, -1], 4, 2, [
        ((0, 2), (0, 8)), ((4, 6), (0, 8)), ((8, 10), (0, 8)), ((12, 14), (0, 8)), ((2, 4), (0, 8)),
        ((6, 8), (0, 8)), ((10, 12), (0, 8)), ((14, 16), (0, 8))]),
    "model.layers.0.attention.wo.weight": ((8, 16), [2, 4], [-1, 0], 4, 2, [
        ((0, 4), (0, 4)), ((0, 4), (4, 8)), ((0, 4), (8, 12)), ((0, 4), (12, 16)), ((4, 8), (0, 4)),
        ((4, 8), (4, 8)), ((4, 8), (8, 12)), ((4, 8), (12, 16))]),
    "model.tok_embeddings.embedding_weight": ((32, 8), [2, 4], [-1, -1], 1, 8, [
        ((4 * r, 4 * r + 4), (0, 8)) for r in range(8)]),
    "nested": ((16, 4), [2, 2, 2], [[2, 1], -1], 0, 0, [
        ((0, 4), (0, 4)), ((0, 4), (0, 4)), ((4, 8), (0, 4)), ((4, 8), (0, 4)), ((8, 12), (0, 4)),
        ((8, 12), (0, 4)), ((12, 16), (0, 4)), ((12, 16), (0, 4))]),
    "permuted": ((8, 8), [2, 2, 2], [0, 1], 4, 2, [  # MindSpore's shortcut (strategy.Layout._shortcut)
        ((0, 2), (0, 4)), ((0, 2), (4, 8)), ((4, 6), (0, 4)), ((4, 6), (4, 8)), ((2, 4), (0, 4)),
        ((2, 4), (4, 8)), ((6, 8), (0, 4)), ((6, 8), (4, 8))]),
    "partial_opt": ((16, 4), [2, 2, 2], [0, -1], 2, 2, [
        ((0, 4), (0, 4)), ((8, 12), (0, 4)), ((4, 8), (0, 4)), ((12, 16), (0, 4)), ((0, 4), (0, 4)),
        ((8, 12), (0, 4)), ((4, 8), (0, 4)), ((12, 16), (0, 4))]),
}


def strategy_bytes(layouts: dict, stage: int = 0) -> bytes:
    """A ``ParallelStrategyMap`` (node_strategy.proto) with one strategy item of ``stage``."""
    items = [fld(2, fld(1, b"MatMul-op0") + fld(2, num(1, stage)))]
    for name, (_, dev, tmap, step, size, *_) in layouts.items():
        if any(isinstance(a, list) for a in tmap):  # one TensorMap per dimension
            maps = b"".join(fld(2, b"".join(num(1, x) for x in (a if isinstance(a, list) else [a]))) for a in tmap)
        else:
            maps = fld(2, b"".join(num(1, x) for x in tmap))
        layout = (fld(1, b"".join(num(1, d) for d in dev)) + maps + fld(3, b"") + fld(4, b"") + num(5, 0) +
                  num(6, step) + num(7, size))
        items.append(fld(3, fld(1, name.encode()) + fld(2, layout)))
    return num(1, 0) + b"".join(items)


def test_strategy_blocks_are_mindspores(tmp_path):
    (tmp_path / "s.ckpt").write_bytes(strategy_bytes(LAYOUTS))
    json_items = {n: {"dev_matrix": dev, "tensor_map": tmap, "field": 0, "opt_weight_shard_step": step,
                      "opt_weight_shard_size": size} for n, (_, dev, tmap, step, size, _) in LAYOUTS.items()}
    (tmp_path / "s.json").write_text(json.dumps({"current_stage": 0, "parallel_layout_item": json_items,
                                                 "parallel_strategy_item": {"op": {"stage": 0}}}))
    for file in ("s.ckpt", "s.json"):
        strategy = load_strategy(str(tmp_path / file))
        assert strategy.world_size == 8
        for name, (shape, *_, blocks) in LAYOUTS.items():
            local = tuple(hi - lo for lo, hi in blocks[0])
            assert strategy.holders(name, local) == (shape, list(enumerate(blocks))), (file, name)
        # an optimizer moment without a layout of its own takes its parameter's
        assert strategy.layout("adam_m.nested") == strategy.layout("nested")


def rank_set(root, layouts: dict, full: dict, extra: dict, stage_of=lambda name: 0, devices: int = 8):
    """rank_r/ folders of .ckpt files holding each rank's blocks (mftune's writer) and ``extra`` whole."""
    for r in range(devices * (1 + max(stage_of(n) for n in layouts))):
        tensors = {}
        for name, (*_, blocks) in layouts.items():
            if r // devices == stage_of(name):
                tensors[name] = full[name][tuple(slice(*b) for b in blocks[r % devices])].contiguous()
        tensors.update(extra)
        path = os.path.join(root, f"rank_{r}", f"llama_rank_{r}-1_4.ckpt")
        os.makedirs(os.path.dirname(path))
        write_ckpt_streaming(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], iter(tensors.items()))


def test_a_distributed_set_reassembles_any_block(tmp_path):
    g = torch.Generator().manual_seed(2)
    full = {n: torch.randn(*shape, generator=g) for n, (shape, *_) in LAYOUTS.items()}
    full["adam_m.model.layers.0.attention.wq.weight"] = torch.randn(16, 8, generator=g)
    layouts = {**LAYOUTS, "adam_m.model.layers.0.attention.wq.weight": LAYOUTS["model.layers.0.attention.wq.weight"]}
    rank_set(tmp_path / "ckpt", layouts, full, {"epoch_num": torch.tensor(1), "step_num": torch.tensor(4),
                                               "model.norm_out.weight": torch.arange(8.0)})
    (tmp_path / "strategy").mkdir()
    for r in range(8):  # one file per rank, as MindFormers writes output/strategy
        (tmp_path / "strategy" / f"ckpt_strategy_rank_{r}.ckpt").write_bytes(strategy_bytes(LAYOUTS))
    root, strategy = str(tmp_path / "ckpt"), str(tmp_path / "strategy")
    assert recognise(root) is mindspore_ranks
    entries = open_checkpoint(root, src_strategy=strategy)
    for name, t in full.items():
        assert entries[name].shape == tuple(t.shape) and torch.equal(entries[name].full(), t), name
        assert torch.equal(entries[name].read((slice(3, 7), slice(1, 4))), t[3:7, 1:4]), name
    assert torch.equal(entries["model.norm_out.weight"].full(), torch.arange(8.0))  # not in the strategy: whole
    assert entries["global_step"].full().item() == 4  # MindFormers' step_num
    with pytest.raises(CheckpointError, match="src_strategy_path_or_dir"):
        open_checkpoint(root)
    (tmp_path / "other.ckpt").write_bytes(strategy_bytes({"nested": ((16, 4), [2, 2], [1, -1], 0, 0, None)}))
    with pytest.raises(CheckpointError, match="has 8 rank folders but strategy .* 4-rank layout"):
        open_checkpoint(root, src_strategy=str(tmp_path / "other.ckpt"))  # another run's strategy
    os.rename(tmp_path / "ckpt" / "rank_3", tmp_path / "rank_3_moved")
    with pytest.raises(CheckpointError, match="lacks rank_3/"):
        open_checkpoint(root, src_strategy=strategy)


def test_pipeline_stages_from_merged_and_per_stage_files(tmp_path):
    """Two stages of 4 devices: stage 0 holds x (ranks 0-3), stage 1 holds y (ranks 4-7)."""
    rows = [((2 * r, 2 * r + 2), (0, 3)) for r in range(4)]
    layouts = {"x": ((8, 3), [4], [0, -1], 0, 0, rows), "y": ((8, 3), [4], [0, -1], 0, 0, rows)}
    full = {"x": torch.arange(24.0).reshape(8, 3), "y": -torch.arange(24.0).reshape(8, 3)}
    rank_set(tmp_path / "ckpt", layouts, full, {}, stage_of=lambda n: int(n == "y"), devices=4)
    (tmp_path / "merged.ckpt").write_bytes(strategy_bytes({f"{int(n == 'y')}-{n}": v for n, v in layouts.items()}))
    (tmp_path / "per_stage").mkdir()
    for r in range(8):
        name = "y" if r >= 4 else "x"
        (tmp_path / "per_stage" / f"ckpt_strategy_rank_{r}.ckpt").write_bytes(
            strategy_bytes({name: layouts[name]}, stage=r // 4))
    for strategy in ("merged.ckpt", "per_stage"):
        entries = open_checkpoint(str(tmp_path / "ckpt"), src_strategy=str(tmp_path / strategy))
        assert torch.equal(entries["x"].full(), full["x"]) and torch.equal(entries["y"].full(), full["y"]), strategy


def test_recognition_of_directories(tmp_path):
    """rank_*/ of .safetensors: mftune's distributed format; of .ckpt: MindSpore's; a folder of .ckpt
    files (with mftune files beside them): their union."""
    (tmp_path / "st" / "rank_0").mkdir(parents=True)
    save_complete(str(tmp_path / "st" / "rank_0" / "a.safetensors"), {"w": torch.ones(2)}, model_config={})
    assert recognise(str(tmp_path / "st")) is distributed
    (tmp_path / "ms" / "rank_0").mkdir(parents=True)
    save_raw(tmp_path / "ms" / "rank_0" / "a.ckpt", {"w": torch.ones(2)})
    assert recognise(str(tmp_path / "ms")) is mindspore_ranks
    (tmp_path / "dir").mkdir()
    save_raw(tmp_path / "dir" / "base.ckpt", {"w": torch.ones(2), "adam_m.w": torch.zeros(2)})
    save_complete(str(tmp_path / "dir" / "lora.safetensors"), {"l": torch.full((3,), 2.0)},
                  model_config={"num_layers": 1})
    assert recognise(str(tmp_path / "dir")) is mindspore_ckpt
    entries = open_checkpoint(str(tmp_path / "dir"))
    assert sorted(entries) == ["adam_m.w", "l", "w"] and torch.equal(entries["l"].full(), torch.full((3,), 2.0))
    assert mindspore_ckpt.header(str(tmp_path / "dir")) == {"model_config": {"num_layers": 1}}
    save_raw(tmp_path / "dir" / "dup.ckpt", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="is in both"):
        open_checkpoint(str(tmp_path / "dir"))
    np.testing.assert_array_equal(open_checkpoint(str(tmp_path / "dir" / "dup.ckpt"))["w"].full().numpy(), [1, 1])


# ----------------------------------------------------------------------------------------------
# the tools, in one process (tests/e2e/test_mindspore_ckpt_runs.py runs the commands and loads their
# outputs in MindSpore)
# ----------------------------------------------------------------------------------------------

def test_convert_to_ckpt_and_back(tmp_path):
    """Hugging Face -> .ckpt (MindFormers' names, the source dtypes) -> Hugging Face, given the model config."""
    from mftune.checkpoint.convert import convert_hf_to_mftune, convert_mftune_to_hf
    from mftune.checkpoint.names import hf_config_to_model_config, hf_to_mftune

    import tiny_hf

    hf = tiny_hf.hf_model()
    hf.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "llama.ckpt")
    convert_hf_to_mftune(str(tmp_path / "hf"), out, dtype="bf16")
    state = {hf_to_mftune(k): v for k, v in hf.state_dict().items()}
    entries = open_checkpoint(out)
    assert sorted(entries) == sorted(state)
    assert all(torch.equal(entries[k].full(), v.bfloat16()) for k, v in state.items())
    with pytest.raises(CheckpointError, match="--config"):
        convert_mftune_to_hf(out, str(tmp_path / "back"))
    convert_mftune_to_hf(out, str(tmp_path / "back"), model_config=hf_config_to_model_config(hf.config.to_dict()))
    back = open_checkpoint(str(tmp_path / "back"))
    assert all(torch.equal(back[k].full(), v.bfloat16()) for k, v in state.items())


def test_transform_writes_mindspore_rank_files(tmp_path):
    """A complete mftune training checkpoint -> the rank files of a MindSpore layout (.ckpt, counters in
    MindFormers' names) -> read back through that strategy: the same tensors."""
    from mftune.checkpoint.transform import transform

    import tiny_checkpoints

    path, tensors, model = tiny_checkpoints.training_file(tmp_path)
    wq = "model.layers.0.attention.wq.weight"
    layouts = {wq: ((32, 32), [2, 4], [0, -1], 4, 2, None),
               "model.tok_embeddings.embedding_weight": ((64, 32), [2, 4], [-1, -1], 1, 8, None)}
    (tmp_path / "strategy.ckpt").write_bytes(strategy_bytes(layouts))
    strategy = load_strategy(str(tmp_path / "strategy.ckpt"))
    files = transform(path, str(tmp_path / "out"), strategy, range(8), output_format="ckpt")
    assert files[3].endswith(os.path.join("train", "rank_3", "checkpoint_3.ckpt"))
    # rank 1: model-parallel piece 1 of 4 (rows 8-16), its first optimizer half (LAYOUTS' first row, scaled by 2)
    assert torch.equal(ckpt_io.read_tensor(files[1], wq), tensors[wq][8:12])
    index = ckpt_index(files[0])
    assert {"step_num", "global_step", "scale_sense", "epoch_num"} <= set(index.tensors)
    assert "rng_state" not in index.tensors and ckpt_io.read_tensor(files[0], "global_step").dtype == torch.int32
    entries = open_checkpoint(str(tmp_path / "out" / "train"), src_strategy=str(tmp_path / "strategy.ckpt"))
    for name, t in tensors.items():
        if name not in ("rng_state", "step_num", "consumed_samples", "global_step"):
            assert torch.equal(entries[name].full(), t), name
    assert entries["global_step"].full().item() == tensors["global_step"].item()
    with pytest.raises(CheckpointError, match="MindSpore strategy"):  # mftune's JSON strategy: MindSpore cannot read it
        transform(path, str(tmp_path / "x"), {0: {"rank": 0, "world_size": 1, "tensors": {}}}, [0],
                  output_format="ckpt")


@pytest.mark.parametrize("variant, named", [("use_rslora", "as plain LoRA these adapters have lora_alpha=16"),
                                            ("use_dora", "has no DoRA"),
                                            ("init_lora_weights", "would not subtract B0 A0")])
def test_transform_to_ckpt_refuses_adapters_mindformers_would_misread(tmp_path, variant, named):
    """A .ckpt records no pet_config and MindFormers scales LoRA by alpha / r without DoRA or PiSSA's subtracted
    factors: such adapters written there would silently mean something else."""
    from mftune.checkpoint.transform import transform

    import lora_checkpoint

    value = "pissa" if variant == "init_lora_weights" else True
    ck = lora_checkpoint.build(tmp_path, {**lora_checkpoint.PET, variant: value})
    with pytest.raises(CheckpointError, match=f"output_format=ckpt is invalid .* use {variant}.*{named}"):
        transform(ck.lora_path, str(tmp_path / "out"), None, [0], output_format="ckpt")
    assert not (tmp_path / "out").exists()


def test_merge_reads_and_writes_ckpt(tmp_path):
    """A LoRA checkpoint as .ckpt (base + adapters + moments, as MindFormers saves it) merges as MindFormers'
    tool does; the result equals mftune's merge of the same tensors."""
    from mftune.checkpoint.merge import merge_lora_checkpoint
    from mftune.checkpoint.safetensors_io import load_tensors

    import lora_checkpoint

    ck = lora_checkpoint.build(tmp_path)
    reference = merge_lora_checkpoint(ck.lora_path, str(tmp_path / "ref"))["output"]
    tensors = {**load_tensors(ck.base_path), **ck.tensors}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    src = str(tmp_path / "lora.ckpt")
    write_ckpt_streaming(src, specs, iter(tensors.items()))
    with pytest.raises(CheckpointError, match="--lora_scaling"):
        merge_lora_checkpoint(src, str(tmp_path / "m0"), output_format="ckpt")
    out = merge_lora_checkpoint(src, str(tmp_path / "m1"), output_format="ckpt", lora_scaling=2.0)["output"]
    assert out.endswith("merged_lora.ckpt")
    ref = load_tensors(reference)
    merged = open_checkpoint(out)
    assert sorted(merged) == sorted(ref) and all(torch.equal(merged[k].full(), v) for k, v in ref.items())
    mc = {**ck.mc, "pet_config": lora_checkpoint.PET}
    out = merge_lora_checkpoint(src, str(tmp_path / "m2"), model_config=mc)["output"]  # scaling from the config
    assert all(torch.equal(t, ref[k]) for k, t in load_tensors(out).items())


def test_export_adapter_from_ckpt(tmp_path):
    from mftune.checkpoint.export import export_peft_adapter
    from mftune.checkpoint.formats import peft_adapter

    import lora_checkpoint

    ck = lora_checkpoint.build(tmp_path)
    src = str(tmp_path / "lora.ckpt")
    write_ckpt_streaming(src, [(k, v.dtype, tuple(v.shape)) for k, v in ck.tensors.items()], iter(ck.tensors.items()))
    with pytest.raises(CheckpointError, match="--lora_rank"):
        export_peft_adapter(src, str(tmp_path / "a0"))
    fallback = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "num_layers": 2}
    config = export_peft_adapter(src, str(tmp_path / "a1"), fallback=fallback)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ref = export_peft_adapter(ck.lora_path, str(tmp_path / "a2"), fallback={"lora_dropout": 0.0})
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in ref.items() if k != "base_model_name_or_path"}
    a, b = peft_adapter.entries(str(tmp_path / "a1")), peft_adapter.entries(str(tmp_path / "a2"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].full(), b[k].full()) for k in a)


def test_resume_from_a_mindspore_checkpoint_is_a_clear_error(tmp_path):
    t = torch.zeros(2, 2)
    path = str(tmp_path / "x.ckpt")
    write_ckpt_streaming(path, [("w", t.dtype, (2, 2))], [("w", t)])
    with pytest.raises(CheckpointError, match="is a MindSpore checkpoint: resume_training continues"):
        find_resume_point(path, True)
