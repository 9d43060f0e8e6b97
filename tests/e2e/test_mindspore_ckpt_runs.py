"""MindSpore .ckpt checkpoints against MindSpore 2.7 itself (skipped without it: tests/mindspore_ref.py).

One MindSpore process writes the fixtures: the parity model's weights (tests/parity.py) as a complete
``.ckpt`` saved by ``mindspore.save_checkpoint`` (tiny ``SLICE_SIZE``, so MindSpore itself splits the
tensors into several Values), an 8-rank distributed set cut from it by MindSpore's own
``transform_checkpoints`` for a dp 2 x mp 4 strategy with optimizer sharding (strategy files written
with MindSpore's ``node_strategy_pb2``: MindSpore 2.7 cannot compile a semi-auto-parallel graph on the
CPU, so it cannot save one from a run), and a LoRA training checkpoint of tests/lora_checkpoint.py's
model. Then: run_finetune.py from the ``.ckpt`` sources trains and evaluates exactly as from the same
weights in safetensors (expected: the safetensors run's numbers), and the tools' ``.ckpt`` outputs load
in ``mindspore.load_checkpoint`` with the expected names, dtypes (bf16, fp16 included), shapes and values
(a second MindSpore process loads them all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mftune.checkpoint.formats import open_checkpoint
from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.merge import merge_lora_checkpoint
from mftune.checkpoint.mindspore.ckpt import ckpt_index
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.data.sample import train_sample_tokenizer

import lora_checkpoint
import parity as pp
import tiny_hf
from mindspore_ref import run_mindspore

MS_FIXTURES = r'''
import json, os, shutil, sys
import numpy as np
import mindspore as ms
import mindspore.train.serialization as ser
from mindspore import Parameter, Tensor
from mindspore.train import node_strategy_pb2 as pb

d = sys.argv[1]
dtypes = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}
base = {k: Tensor(v).astype(dtypes[t]) for (k, v), t in zip(np.load(os.path.join(d, "base.npz")).items(),
                                                              json.load(open(os.path.join(d, "dtypes.json"))).values())}
ser.SLICE_SIZE = 64  # KB: MindSpore splits every tensor over 64 KiB into several Values, as it does at 512 MiB
os.makedirs(os.path.join(d, "full", "rank_0"))
ms.save_checkpoint([Parameter(v, name=k) for k, v in base.items()] +
                   [Parameter(Tensor(np.float32(0.01)), name="learning_rate")],
                   os.path.join(d, "full", "rank_0", "llama_tiny.ckpt"),
                   append_dict={"epoch_num": 1, "step_num": 6, "loss_scale": 1.0})
ser.SLICE_SIZE = 512 * 1024

strategy = pb.ParallelStrategyMap()
strategy.current_stage = 0
item = strategy.parallel_strategy_item.add()
item.node_name, item.parallel_strategys.stage = "MatMul-op0", 0
for name, (tensor_map, step, size) in json.load(open(os.path.join(d, "layouts.json"))).items():
    layout = strategy.parallel_layout_item.add()
    layout.param_name = name
    lay = layout.parallel_layouts
    lay.dev_matrix.add().dim.extend([2, 4])
    lay.tensor_map.add().dim.extend(tensor_map)
    lay.param_split_shape.add()
    lay.indices_offset.add()
    lay.field, lay.opt_weight_shard_step, lay.opt_weight_shard_size = 0, step, size
os.makedirs(os.path.join(d, "strategy"))
for r in range(8):  # every rank's file, as MindFormers writes output/strategy
    with open(os.path.join(d, "strategy", f"ckpt_strategy_rank_{r}.ckpt"), "wb") as f:
        f.write(strategy.SerializeToString())
ms.transform_checkpoints(os.path.join(d, "full"), os.path.join(d, "dist"), "llama_tiny_rank_", None,
                         os.path.join(d, "strategy", "ckpt_strategy_rank_0.ckpt"))

lora = dict(np.load(os.path.join(d, "lora.npz")))
ms.save_checkpoint([Parameter(Tensor(v), name=k) for k, v in lora.items()], os.path.join(d, "lora.ckpt"),
                   append_dict={"epoch_num": 1, "step_num": 3, "loss_scale": 1.0, "note": "a string"})
'''

MS_LOAD = r'''
import json, sys
import numpy as np
import mindspore as ms
# first MindSpore's own merge of a rank set (src dir, dst dir, strategy), then load every file named
ms.transform_checkpoints(sys.argv[2], sys.argv[3], "merged_", sys.argv[4], None)
out = {}
for path in sys.argv[5:]:
    params = ms.load_checkpoint(path)
    out[path] = {k: [str(v.dtype), list(v.shape)] for k, v in params.items() if hasattr(v, "dtype")}
    np.savez(path + ".npz", **{k: v.astype(ms.float32).asnumpy() for k, v in params.items() if hasattr(v, "dtype")})
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
'''

def layouts(names) -> dict[str, tuple[list[int], int, int]]:
    """MindFormers' Llama layouts on dp 2 x mp 4 with the parallel optimizer: column-parallel weights split
    rows over mp, row-parallel ones columns, the vocabulary-replicated embedding and every weight's first
    dimension sharded over dp (``opt_weight_shard_size`` -1: all repeated devices), norms replicated."""
    out = {}
    for n in names:
        if n.endswith(("wo.weight", "w2.weight")):
            out[n] = ([-1, 0], 4, 2)
        elif n.endswith("embedding_weight"):
            out[n] = ([-1, -1], 1, -1)
        elif "norm" in n:
            out[n] = ([-1], 0, 0)
        else:
            out[n] = ([0, -1], 4, 2)
    return out


@pytest.fixture(scope="module")
def ms_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mindspore")
    config = pp.make_workdir(str(d))
    base = load_tensors(str(d / "base.safetensors"))  # some weights in bf16 and fp16, in every source alike
    base.update({k: v.to(torch.bfloat16 if "norm" in k else torch.float16) for k, v in base.items()
                 if "norm" in k or k.endswith("w2.weight")})
    mc = read_metadata(str(d / "base.safetensors"))["model_config"]
    save_complete(str(d / "base.safetensors"), base, model_config=mc)
    np.savez(d / "base.npz", **{k: v.float().numpy() for k, v in base.items()})
    (d / "dtypes.json").write_text(json.dumps({k: str(v.dtype)[6:] for k, v in base.items()}))
    (d / "layouts.json").write_text(json.dumps(layouts(base)))
    ck = lora_checkpoint.build(d / "lora_src")
    lora = {**load_tensors(ck.base_path), **ck.tensors}
    np.savez(d / "lora.npz", **{k: v.numpy() for k, v in lora.items()})
    run_mindspore(MS_FIXTURES, str(d))
    return d, config, base, ck


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=pp.ROOT, capture_output=True, text=True)


def test_mindspore_files_read_as_written(ms_files, tmp_path):
    """MindSpore's files give the tensors MindSpore was given, from the complete file, the rank set
    and auto_trans_ckpt's transform of the rank set (what run_finetune.py does with --auto_trans_ckpt)."""
    from mftune.checkpoint.transform import auto_transform

    d, _, base, _ = ms_files
    complete = open_checkpoint(str(d / "full" / "rank_0" / "llama_tiny.ckpt"))
    stored = ckpt_index(str(d / "full" / "rank_0" / "llama_tiny.ckpt")).tensors
    assert len(stored["model.tok_embeddings.embedding_weight"].runs) == 4  # MindSpore split it (256 KiB, 64 KiB runs)
    dist = open_checkpoint(str(d / "dist"), src_strategy=str(d / "strategy"))
    for name, t in base.items():
        assert torch.equal(complete[name].full(), t) and torch.equal(dist[name].full(), t), name
    assert complete["global_step"].full().item() == 6 and "learning_rate" not in complete
    some = os.path.join(str(d / "dist"), "rank_5", "llama_tiny_rank_5.ckpt")
    wq = "model.layers.1.attention.wq.weight"  # rank 5: mp piece 1 (rows 16-32), dp half 1 (rows 24-32)
    assert torch.equal(open_checkpoint(some)[wq].full(), base[wq][24:32])
    _, files = auto_transform(str(d / "dist"), str(tmp_path), rank=0, world_size=1, src_strategy=str(d / "strategy"))
    transformed = load_tensors(files[0])
    assert all(torch.equal(transformed[k], v) for k, v in base.items()) and transformed["global_step"].item() == 6


def test_runs_from_ckpt_match_safetensors(ms_files, tmp_path):
    """finetune from the 8-rank set (--src_strategy_path_or_dir, resharded on load) and eval from the
    complete .ckpt: the numbers of the same weights given as safetensors."""
    d, config, _, _ = ms_files
    sources = {"safetensors": [str(d / "base.safetensors")],
               "ckpt": [str(d / "full" / "rank_0" / "llama_tiny.ckpt")],
               "ranks": [str(d / "dist"), "--src_strategy_path_or_dir", str(d / "strategy")]}
    results = {}
    for mode, name in (("finetune", "safetensors"), ("finetune", "ranks"), ("eval", "safetensors"), ("eval", "ckpt")):
        out = str(tmp_path / f"{mode}_{name}")
        extra = ["--eval_dataset_dir", str(d / "data")] if mode == "eval" else []
        r = _run(*pp._args(config, mode, out, 1, 1, {"batch_size": 16}), *extra, "--load_checkpoint", *sources[name])
        assert r.returncode == 0, r.stderr[-3000:]
        if mode == "eval":
            with open(os.path.join(out, "eval_results.json")) as f:
                results[mode, name] = json.load(f)
        else:
            results[mode, name] = pp.losses(out)
    assert len(results["finetune", "safetensors"]) == 3
    assert results["finetune", "ranks"] == results["finetune", "safetensors"]
    assert results["eval", "safetensors"]["tokens"] > 0 and results["eval", "ckpt"] == results["eval", "safetensors"]


def test_predict_from_ckpt_matches_safetensors(ms_files, tmp_path):
    """predict (greedy, KV cache) from the complete .ckpt generates the tokens of the safetensors twin."""
    d, config, _, _ = ms_files
    vocab = train_sample_tokenizer(str(tmp_path / "tok"), 1000)  # the tiny model's vocabulary size
    outputs = {}
    for name, source in (("safetensors", str(d / "base.safetensors")),
                         ("ckpt", str(d / "full" / "rank_0" / "llama_tiny.ckpt"))):
        out = str(tmp_path / name)
        r = _run(*pp._args(config, "predict", out, 1, 1, {}), "--load_checkpoint", source, "--predict_data",
                 "Give three tips for staying healthy.", "--processor.tokenizer.vocab_file", vocab,
                 "--model.model_config.max_decode_length", "40")
        assert r.returncode == 0, r.stderr[-3000:]
        with open(os.path.join(out, "predict_results.jsonl")) as f:
            outputs[name] = [json.loads(line)["output_ids"] for line in f]
    assert outputs["ckpt"] == outputs["safetensors"] and len(outputs["ckpt"][0]) > 0


def test_tools_write_ckpt_that_mindspore_loads(ms_files, tmp_path):
    """convert_weight.py (bf16), transform_checkpoint.py (MindSpore rank set -> complete .ckpt; safetensors
    -> MindSpore's 8-rank layout, which MindSpore's own transform_checkpoints puts back together) and
    transform_ckpt_lora.py (MindFormers' merged_lora.ckpt): MindSpore loads the names, dtypes, shapes and
    values expected (the sources'; the merge: mftune's merge of the same LoRA in safetensors)."""
    d, config, base, ck = ms_files
    tiny_hf.hf_model().save_pretrained(tmp_path / "hf")
    counters = {"epoch_num": torch.tensor(1), "step_num": torch.tensor(6), "loss_scale": torch.tensor(1.0),
                "scale_sense": torch.tensor(1.0), "global_step": torch.tensor([6], dtype=torch.int32)}
    outputs = {str(tmp_path / "llama.ckpt"): {k: e.full().bfloat16() for k, e in
                                              open_checkpoint(str(tmp_path / "hf")).items()},
               str(tmp_path / "merged" / "dist" / "rank_0" / "checkpoint_0.ckpt"): {**base, **counters},
               str(tmp_path / "ms_merged" / "rank_0" / "merged_0.ckpt"): base,
               str(tmp_path / "lora" / "merged_lora.ckpt"): load_tensors(
                   merge_lora_checkpoint(ck.lora_path, str(tmp_path / "lora_ref"))["output"])}
    for args in (("scripts/convert_weight.py", "--input_path", str(tmp_path / "hf"), "--output_path",
                  str(tmp_path / "llama.ckpt"), "--dtype", "bf16"),
                 ("scripts/transform_checkpoint.py", "--src_checkpoint", str(d / "dist"), "--src_strategy",
                  str(d / "strategy"), "--dst_checkpoint_dir", str(tmp_path / "merged"), "--output_format", "ckpt"),
                 ("scripts/transform_checkpoint.py", "--src_checkpoint", str(d / "base.safetensors"), "--dst_strategy",
                  str(d / "strategy"), "--dst_checkpoint_dir", str(tmp_path / "ranks"), "--output_format", "ckpt"),
                 ("scripts/transform_ckpt_lora.py", "--src_ckpt_path_or_dir", str(d / "lora.ckpt"), "--dst_ckpt_dir",
                  str(tmp_path / "lora"), "--output_format", "ckpt", "--lora_scaling", "2")):
        r = _run(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    ranks = [str(tmp_path / "ranks" / "base" / f"rank_{i}" / f"checkpoint_{i}.ckpt") for i in range(8)]
    run_mindspore(MS_LOAD, str(tmp_path / "loaded.json"), str(tmp_path / "ranks" / "base"), str(tmp_path / "ms_merged"),
                  str(d / "strategy" / "ckpt_strategy_rank_0.ckpt"), *outputs, *ranks)
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    ms_dtype = {torch.float32: "Float32", torch.bfloat16: "BFloat16", torch.float16: "Float16", torch.int64: "Int64",
                torch.int32: "Int32"}
    for path, expected in outputs.items():
        values = np.load(path + ".npz")
        assert sorted(loaded[path]) == sorted(expected), path
        for name, t in expected.items():
            assert loaded[path][name] == [ms_dtype[t.dtype], list(t.shape)], (path, name)
            assert np.array_equal(values[name], t.float().numpy()), (path, name)
    wq, w2 = "model.layers.1.attention.wq.weight", "model.layers.0.feed_forward.w2.weight"
    assert np.array_equal(np.load(ranks[5] + ".npz")[wq], base[wq][24:32].numpy())  # MindSpore's rank-5 slice
    assert loaded[ranks[5]][w2] == ["Float16", [32, 44]]  # dp half 1 of the rows, mp piece 1 of the columns

    r = _run("scripts/convert_weight.py", "--reversed", "--input_path", str(d / "full" / "rank_0" / "llama_tiny.ckpt"),
             "--output_path", str(tmp_path / "hf_back"), "--config", config)
    assert r.returncode == 0, r.stderr
    back = open_checkpoint(str(tmp_path / "hf_back"))
    assert all(torch.equal(back[k].full(), v) for k, v in base.items())
