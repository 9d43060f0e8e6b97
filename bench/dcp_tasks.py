"""The measured steps of bench/dcp_compare.py, one per process (that script explains every column).

    python bench/dcp_tasks.py TASK --workdir DIR [--source SRC] [model options]   # started by dcp_compare.py

Each task builds what it needs (a model, a state dict, block-shaped tensors), measures one section
with ``Meter`` (wall time, memory growth, bytes read) and, on 4 ranks, ``CollectiveCounter``, checks
what it loaded against ``source.safetensors`` bit for bit (block bounds from torch, not from mftune),
and writes its results to DIR/results/TASK.SOURCE.RANK.json for the driver to tabulate.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from measure import CollectiveCounter, Meter, ru_maxrss  # noqa: E402
WORLD = 4
SOURCE = "source.safetensors"  # the reference every loaded tensor is compared with
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors dtype -> torch dtype name

# ----------------------------------------------------------------------------------------------
# model, layouts, verification


def _model_config(args) -> dict:
    return {"seq_length": 128, "hidden_size": args.hidden, "num_layers": args.layers,
            "num_heads": args.heads, "n_kv_heads": args.kv_heads, "vocab_size": args.vocab,
            "multiple_of": 256, "compute_dtype": "float32", "param_init_type": "float32",
            "rotary_dtype": "float32", "use_flash_attention": False}


def _meta_model(args):
    import torch
    from mftune import LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(_model_config(args))


def _materialise(model):
    model.to_empty(device="cpu")
    _touch(model)
    return model


def _sharded_model(args, dim1: bool):
    """The 4-rank FSDP2 model: dp=4, every parameter Shard(0) (the target), or every 2-D weight
    Shard(1) (``dim1``: the other layout the sharded DCP checkpoints are saved from)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    model = _meta_model(args)
    kw = {"mesh": mesh}
    if dim1:
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.ndim == 2 else Shard(0)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return _materialise(model)


def _dp_tp_model(args):
    """The optional 2x2 target: tensor parallel (torch's ColwiseParallel / RowwiseParallel plan on the
    "tp" mesh dim) then FSDP2 over "dp" (the embedding is a plain Parameter here: FSDP2 only)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _meta_model(args)
    plan = {"lm_head": ColwiseParallel()}
    for i in range(len(model.model.layers)):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return _materialise(model)


def _touch(model):
    """Fault in the parameters' memory (to_empty leaves it untouched) so that a measured load's memory
    growth is the loader's own overhead, not the model's shards being paged in."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            _local(p).zero_()


def _local(p):
    from torch.distributed.tensor import DTensor
    return p.to_local() if isinstance(p, DTensor) else p


def _block_of(p) -> tuple:
    """The global index block a DTensor's local shard holds, computed by torch (not by mftune)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _same(got, ref) -> bool:
    """Same shape and the same bytes."""
    import torch

    def bits(t):
        return t.detach().contiguous().reshape(-1).view(torch.uint8)
    return got is not None and tuple(got.shape) == tuple(ref.shape) and torch.equal(bits(got), bits(ref))


def _verify_params(model, workdir: str) -> dict:
    """Every parameter's local part equal, bit for bit, to the same block of the source."""
    from safetensors import safe_open
    ok, checked = True, 0
    with safe_open(os.path.join(workdir, SOURCE), framework="pt") as f:
        for name, p in model.named_parameters():
            ok &= _same(_local(p), f.get_slice(name)[_block_of(p)])
            checked += 1
    return {"bitwise": bool(ok), "checked": checked}


def row_block(n: int, rank: int) -> tuple[int, int]:
    """torch.chunk bounds of dim 0 over WORLD ranks (what FSDP2's Shard(0) holds on ``rank``)."""
    size = -(-n // WORLD)
    return min(rank * size, n), min((rank + 1) * size, n)


def _verify_blocks(blocks: dict, workdir: str, rank: int) -> dict:
    from safetensors import safe_open
    ok = True
    with safe_open(os.path.join(workdir, SOURCE), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            sl = f.get_slice(name)
            lo, hi = row_block(sl.get_shape()[0], rank)
            ok &= _same(blocks.get(name), sl[lo:hi])
    return {"bitwise": bool(ok), "checked": len(names)}


def source_shapes(workdir: str) -> dict[str, tuple[list[int], str]]:
    """Shape and safetensors dtype of every tensor of the source, from its header."""
    with open(os.path.join(workdir, SOURCE), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def _empty_blocks(args) -> tuple[dict, dict]:
    """Uninitialised tensors shaped like rank ``args.rank``'s row block of every tensor, and their offsets."""
    import torch
    blocks, offsets = {}, {}
    for name, (shape, dtype) in source_shapes(args.workdir).items():
        lo, hi = row_block(shape[0], args.rank)
        blocks[name] = torch.empty([hi - lo, *shape[1:]], dtype=getattr(torch, DTYPES[dtype]))
        offsets[name] = [lo] + [0] * (len(shape) - 1)
    return blocks, offsets


# ----------------------------------------------------------------------------------------------
# saves


def task_gen(args):
    import torch
    from safetensors.torch import save_file
    from mftune import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(_model_config(args))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.workdir, SOURCE), metadata={"format": "pt"})
    return {"tensors": len(sd), "bytes": sum(v.numel() * v.element_size() for v in sd.values())}


def _load_source(args):
    """The source tensors in private memory (load_file maps the file; clone so that a writer's
    measured memory does not include first-touching the source's file pages)."""
    from safetensors.torch import load_file
    return {k: v.clone() for k, v in load_file(os.path.join(args.workdir, SOURCE)).items()}


def _timed_saves(args, save) -> dict:
    """``save()`` --repeats times (fsync makes single timings noisy): the first one's memory, every time."""
    first, runs = None, []
    for _ in range(args.repeats):
        os.sync()  # earlier writes' dirty pages flushed first, outside the timing (each save fsyncs its own)
        with Meter() as m:
            save()
        first = first or m.as_dict()
        runs.append(m.seconds)
    return {**first, "runs": runs}


def task_save_mftune(args):
    from mftune.checkpoint import save_complete
    sd = _load_source(args)
    path = os.path.join(args.workdir, "mftune.safetensors")
    return _timed_saves(args, lambda: save_complete(path, sd, model_config=_model_config(args)))


def task_save_dcp(args):
    import torch.distributed.checkpoint as dcp
    sd = _load_source(args)
    path = os.path.join(args.workdir, "dcp_full")
    return _timed_saves(args, lambda: dcp.save(sd, checkpoint_id=path, no_dist=True))


def task_save_hf(args):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    sd = _load_source(args)
    path = os.path.join(args.workdir, "hf_full")
    return _timed_saves(args, lambda: dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path), no_dist=True))


def _fill_from_source(model, workdir: str):
    import torch
    from safetensors import safe_open
    with safe_open(os.path.join(workdir, SOURCE), framework="pt") as f, torch.no_grad():
        for name, p in model.named_parameters():
            _local(p).copy_(f.get_slice(name)[_block_of(p)])


def task_save_sharded(args):
    """4 ranks, FSDP2 with 2-D weights on Shard(1): DCP FileSystemWriter and HuggingFaceStorageWriter."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    model = _sharded_model(args, dim1=True)
    placements = sorted({str(p.placements) for p in model.parameters()})
    _fill_from_source(model, args.workdir)
    res = {"placements": placements}
    for key in ("dcp", "hf"):
        sd = model.state_dict()
        os.sync()
        dist.barrier()
        with CollectiveCounter() as cc, Meter() as m:
            if key == "dcp":
                dcp.save(sd, checkpoint_id=os.path.join(args.workdir, "dcp_sharded"))
            else:
                path = os.path.join(args.workdir, "hf_sharded")
                dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True))
        res[key] = {**m.as_dict(), "collectives": cc.calls}
    return res


# ----------------------------------------------------------------------------------------------
# loads


LOAD_SOURCES = {
    "mftune": "mftune.safetensors",
    "dcp_full": "dcp_full",
    "dcp_sharded": "dcp_sharded",
    "hf_full": "hf_full",
    "hf_sharded": "hf_sharded",
}


def _dcp_reader(kind: str, path: str) -> dict:
    """dcp.load's keyword for a checkpoint: HuggingFaceStorageReader for the hf_* ones."""
    if kind.startswith("hf"):
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        return {"storage_reader": HuggingFaceStorageReader(path)}
    return {"checkpoint_id": path}


def _do_load(kind: str, model, path: str, no_dist: bool = False):
    """mftune ``load_checkpoint`` or ``dcp.load`` of model.state_dict() (its DTensors are the model's
    sharded parameters: dcp.load fills them in place)."""
    if kind == "mftune":
        from mftune.checkpoint import load_checkpoint
        load_checkpoint(model, path)
        return
    import torch.distributed.checkpoint as dcp
    dcp.load(model.state_dict(), **_dcp_reader(kind, path), no_dist=no_dist)


def task_load(args):
    """Part 1: 4 ranks, FSDP2 dp=4 Shard(0) (or the 2x2 layout: SOURCE@tp), load from args.source."""
    import torch.distributed as dist
    kind, _, layout = args.source.partition("@")
    path = os.path.join(args.workdir, LOAD_SOURCES[kind])
    import torch.distributed.checkpoint  # noqa: F401  (imports outside the measured section)
    from mftune.checkpoint import load_checkpoint  # noqa: F401
    model = _dp_tp_model(args) if layout == "tp" else _sharded_model(args, dim1=False)
    placements = sorted({str(p.placements) for p in model.parameters()})
    runs, coll_s = [], []
    first = None
    for i in range(args.repeats):
        dist.barrier()
        with CollectiveCounter() as cc, Meter() as m:
            _do_load(kind, model, path)
        if first is None:
            first = {**m.as_dict(), "collectives": cc.calls}
        runs.append(m.seconds)
        coll_s.append(cc.seconds)
        dist.barrier()
    return {**first, "runs": runs, "coll_seconds": coll_s, **_verify_params(model, args.workdir),
            "placements": placements}


def _offline(m: Meter, verified: dict) -> dict:
    """An offline task's result: its measurement, its check, and whether a process group existed."""
    import torch.distributed as dist
    return {**m.as_dict(), **verified, "process_group": bool(dist.is_available() and dist.is_initialized())}


def task_block_pread(args):
    """mftune's own reader (``mftune.checkpoint.safetensors_io``): the header parsed once, then each
    tensor's rows of the block read with os.preadv straight into a fresh tensor."""
    from mftune.checkpoint.safetensors_io import read_block, safetensors_header
    path = os.path.join(args.workdir, "mftune.safetensors")
    blocks = {}
    with Meter() as m:
        for name, info in safetensors_header(path)[1].items():
            lo, hi = row_block(info["shape"][0], args.rank)
            blocks[name] = read_block(path, name, (slice(lo, hi), *(slice(None) for _ in info["shape"][1:])))
    return _offline(m, _verify_blocks(blocks, args.workdir, args.rank))


def task_block_safeopen(args):
    from safetensors import safe_open
    path = os.path.join(args.workdir, "mftune.safetensors")
    blocks = {}
    with Meter() as m:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                lo, hi = row_block(sl.get_shape()[0], args.rank)
                blocks[name] = sl[lo:hi].clone()  # own the rows (no view into the map)
    return _offline(m, _verify_blocks(blocks, args.workdir, args.rank))


def task_block_dcp_keys(args):
    """DCP, no process group: _load_state_dict_from_keys one key at a time (whole tensor), keep the rows."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    path = os.path.join(args.workdir, args.source)
    names = list(source_shapes(args.workdir))
    blocks = {}
    with Meter() as m:
        for name in names:
            sd = _load_state_dict_from_keys({name}, checkpoint_id=path)
            t = sd.pop(name)
            lo, hi = row_block(t.shape[0], args.rank)
            blocks[name] = t[lo:hi].clone()
            del t, sd
    return _offline(m, _verify_blocks(blocks, args.workdir, args.rank))


def _block_planner(offsets: dict):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    import torch

    class BlockLoadPlanner(DefaultLoadPlanner):
        """Ask DCP's resharding for one block per tensor (state_dict holds block-shaped tensors)."""

        def create_local_plan(self):
            items = []
            for fqn, t in self.state_dict.items():
                md = self.metadata.state_dict_metadata[fqn]
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=t.size())
                items += create_read_items_for_chunk_list(fqn, md, [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return BlockLoadPlanner()


def task_block_dcp_planner(args):
    """DCP, no process group: dcp.load(no_dist=True) of block-shaped tensors with a block planner."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(args.workdir, args.source)
    blocks, offsets = _empty_blocks(args)
    with Meter() as m:
        dcp.load(blocks, **_dcp_reader(args.source, path), planner=_block_planner(offsets), no_dist=True)
    return _offline(m, _verify_blocks(blocks, args.workdir, args.rank))


def task_full_offline(args):
    """The whole model into one process, no process group: mftune load_checkpoint or dcp.load(no_dist=True)."""
    import torch.distributed.checkpoint  # noqa: F401  (imports outside the measured section)
    from mftune.checkpoint import load_checkpoint  # noqa: F401
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: F401
    model = _materialise(_meta_model(args))
    path = os.path.join(args.workdir, LOAD_SOURCES[args.source])
    with Meter() as m:
        _do_load(args.source, model, path, no_dist=True)
    return _offline(m, _verify_params(model, args.workdir))


# ----------------------------------------------------------------------------------------------
# the worker process


TASKS = {"gen": task_gen, "save_mftune": task_save_mftune, "save_dcp": task_save_dcp, "save_hf": task_save_hf,
         "save_sharded": task_save_sharded, "load": task_load, "block_pread": task_block_pread,
         "block_safeopen": task_block_safeopen, "block_dcp_keys": task_block_dcp_keys,
         "block_dcp_planner": task_block_dcp_planner, "full_offline": task_full_offline}
DISTRIBUTED = {"save_sharded", "load"}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options the driver takes and passes on to every worker (``worker_argv``)."""
    ap.add_argument("--hidden", type=int, default=1024, help="hidden_size")
    ap.add_argument("--layers", type=int, default=8, help="num_layers")
    ap.add_argument("--heads", type=int, default=16, help="num_heads")
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=None, help="n_kv_heads (default: num_heads)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocab_size")
    ap.add_argument("--repeats", type=int, default=3, help="loads per 4-rank process (best reported)")
    ap.add_argument("--rank", type=int, default=1, help="whose dp=4 block part 2 extracts")


def worker_argv(args, task: str, source: str = "") -> list[str]:
    """This script's command line for ``task`` with the driver's ``args``."""
    argv = [os.path.abspath(__file__), task, "--workdir", args.workdir, "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--heads", str(args.heads), "--vocab", str(args.vocab),
            "--repeats", str(args.repeats), "--rank", str(args.rank)] + (["--source", source] if source else [])
    if args.kv_heads:
        argv += ["--kv-heads", str(args.kv_heads)]
    if args.mftune_root:
        argv += ["--mftune-root", args.mftune_root]
    return argv


def worker(args):
    import torch  # noqa: F401  (imported before any measured section in every task)
    import warnings
    warnings.filterwarnings("ignore")
    rank = 0
    if args.task in DISTRIBUTED:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    result = TASKS[args.task](args)
    result["ru_maxrss_end"] = ru_maxrss()
    with open(os.path.join(args.workdir, "results", f"{args.task}.{args.source or '-'}.{rank}.json"), "w") as f:
        json.dump(result, f)
    if args.task in DISTRIBUTED:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--workdir", required=True, help="the driver's workdir (source.safetensors, results/)")
    ap.add_argument("--source", default="", help="which checkpoint a load/block task reads")
    ap.add_argument("--mftune-root", dest="mftune_root", default=None, help="import mftune from DIR/mftune")
    add_model_args(ap)
    args = ap.parse_args(argv)
    if args.mftune_root:
        sys.path.insert(0, os.path.abspath(args.mftune_root))
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
