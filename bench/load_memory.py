"""Peak host memory (RSS) per rank while loading a Llama2-7B-shaped checkpoint on 8 CPU ranks.

    python bench/load_memory.py --make-checkpoint /tmp/mftune-rss/llama2_7b_bf16.safetensors
    python bench/load_memory.py --checkpoint /tmp/mftune-rss/llama2_7b_bf16.safetensors  # the YAML's layout
    python bench/load_memory.py --checkpoint /tmp/mftune-rss/llama2_7b_bf16.safetensors --vocab-emb-dp False
    python bench/load_memory.py --make-checkpoint /tmp/mftune-rss/l2.safetensors --layers 2   # smoke
    python bench/load_memory.py --checkpoint /tmp/mftune-rss/l2.safetensors --layers 2

``--make-checkpoint`` writes a complete mftune checkpoint (safetensors, MindFormers names, the
model_config in the header as ``mftune.checkpoint.save_complete`` puts it) with the shapes of
``configs/llama2/lora_llama2_7b.yaml``'s model_config, param_init_type bfloat16, and random bf16
values. The file is written by hand, streaming: header first, then the tensors' bytes generated and
written 64 MB at a time, so the writer holds ~0.1 GB besides torch instead of the 13.5 GB model.

The default mode re-launches itself under torchrun (``--ranks`` ranks, gloo on CPU). Every rank
runs the trainer's real path, ``mftune.trainer.build.build_model``: meta build -> LoRA (the 7B
YAML's pet_config) -> tensor parallel (data_parallel 1, model_parallel 8) -> ``to_empty`` ->
``load_checkpoint`` (each rank reads only its block, tensor by tensor). Each rank reports its
share (bytes of its local parameters), its peak RSS (VmHWM = ``ru_maxrss``), its current RSS and
the load time; rank 0 prints the table, the baseline (RSS after ``import torch`` + process group,
before the model) and what a naive per-rank load (the whole checkpoint in every process) would
hold. The loaded blocks are then checked against the file, read independently (numpy memmap of
the raw bytes, block bounds computed here, not by mftune).

Before launching, the summed estimate (ranks x (share + overhead)) is compared with MemAvailable;
the run is refused when it does not fit (``--force`` runs it anyway).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from measure import PeakSampler, mem_available, proc_status  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "llama2", "lora_llama2_7b.yaml")
GB = 1e9
CHUNK_ELEMENTS = 32 * 2 ** 20  # the checkpoint writer generates and writes 64 MB at a time
PER_RANK_OVERHEAD_GUESS = 0.6 * GB  # a rank's memory besides its share (python, torch, gloo, transients)


def _overrides(args, checkpoint: str | None) -> dict:
    over = {"run_mode": "finetune", "use_parallel": True,
            "parallel_config.data_parallel": 1, "parallel_config.model_parallel": args.ranks,
            "parallel_config.vocab_emb_dp": args.vocab_emb_dp,
            "model.model_config.param_init_type": "bfloat16",
            "model.model_config.compute_dtype": "bfloat16",
            "model.model_config.num_layers": args.layers}
    if checkpoint:
        over["load_checkpoint"] = checkpoint
    return over


def load_cfg(args, checkpoint: str | None = None):
    """The 7B LoRA YAML with this benchmark's layout and dtypes (no dataset needed)."""
    from mftune.config import load_config

    return load_config(CONFIG, overrides=_overrides(args, checkpoint), check_files=False)


# ---------------------------------------------------------------------------------- checkpoint

def checkpoint_specs(model_config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every base tensor, in the model's state_dict order (built on meta)."""
    import torch

    from mftune.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_bf16(rng, shape: tuple[int, ...]):
    """Random finite bf16 values, +-[2^-7, 2^-3) (random sign, 2 exponent bits, 7 mantissa bits):
    bit-twiddled random bytes, ~5x faster than normal_() on this CPU."""
    import numpy as np
    import torch

    bits = np.frombuffer(bytearray(rng.bytes(2 * _numel(shape))), dtype=np.uint16)
    bits &= 0x81FF  # sign, exponent's 2 low bits, mantissa
    bits |= 0x3C00  # exponent 120..123
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)


def make_checkpoint(args) -> int:
    """Write the checkpoint in safetensors format by hand, one tensor at a time."""
    import numpy as np
    import torch

    from mftune.models.config import LlamaConfig

    start = time.perf_counter()
    cfg = load_cfg(args)
    mc = dict(cfg.model.model_config)
    mc.pop("pet_config", None)  # a base checkpoint, as a pretrained Llama2-7B file would be
    model_config = LlamaConfig.from_dict(mc)
    specs = checkpoint_specs(model_config)
    metadata = {"format": "pt",  # what mftune.checkpoint.save_complete writes
                "mftune_model_config": json.dumps(model_config.to_dict(), default=str)}
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    total = 8 + len(raw) + offset
    path = os.path.abspath(args.make_checkpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    free = os.statvfs(os.path.dirname(path))
    if free.f_bavail * free.f_frsize < total * 1.05:
        print(f"not enough disk space in {os.path.dirname(path)}: need {total / GB:.1f} GB", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for i, (name, shape) in enumerate(specs):
                rows = max(1, CHUNK_ELEMENTS // max(1, _numel(shape[1:])))
                for r in range(0, shape[0], rows):  # <= 64 MB at a time
                    t = random_bf16(rng, (min(rows, shape[0] - r),) + shape[1:])
                    f.write(t.view(-1).view(torch.int16).numpy().data)
                    del t
                if (i + 1) % 50 == 0 or i + 1 == len(specs):
                    print(f"  {i + 1}/{len(specs)} tensors, {f.tell() / GB:.2f} GB", flush=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    written = time.perf_counter() - start
    print(f"wrote {path}: {len(specs)} tensors, {total / GB:.2f} GB ({total} bytes), {written:.0f} s; "
          f"writer peak RSS {proc_status()['VmHWM'] / GB:.2f} GB")
    verify_file(path, specs, model_config)
    return 0


def verify_file(path: str, specs, model_config) -> None:
    """Re-open with safetensors (and mftune's reader): keys, shapes, dtype, metadata, a few values."""
    import torch
    from safetensors import safe_open

    from mftune.checkpoint.safetensors_io import read_metadata

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        assert sorted(keys) == sorted(n for n, _ in specs), "key set differs"
        for name, shape in specs:
            assert tuple(f.get_slice(name).get_shape()) == shape, name
            assert f.get_slice(name).get_dtype() == "BF16", name
        probe = [specs[0][0], specs[len(specs) // 2][0], specs[-1][0]]
        for name in probe:
            block = f.get_slice(name)[:2]
            assert block.dtype == torch.bfloat16 and torch.isfinite(block).all(), name
            assert block.abs().min() >= 2 ** -7 and block.abs().max() < 2 ** -3, name
    meta = read_metadata(path)
    assert meta["model_config"] == json.loads(json.dumps(model_config.to_dict(), default=str))
    print(f"verified {path} with safetensors.safe_open: {len(keys)} keys, shapes and dtype BF16 as the "
          f"model's; values finite; mftune read_metadata model_config num_layers="
          f"{meta['model_config']['num_layers']}")


# ---------------------------------------------------------------------------------- launcher

def estimate_share(args, model_config) -> int:
    """The estimated per-rank share in bytes (the largest over ranks), from the meta model with LoRA: sharded
    weights / ranks, replicated ones whole; LoRA parameters float32 (trainable)."""
    import torch

    from mftune.models.llama import LlamaForCausalLM
    from mftune.pet import get_pet_model

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    get_pet_model(model, model_config.pet_config)
    tp, total = args.ranks, 0
    for name, p in model.named_parameters():
        size = p.numel() * (4 if p.requires_grad else p.element_size())
        replicated = ("norm" in name or "lora" in name
                      or (args.vocab_emb_dp and ("embedding" in name or "lm_head" in name)))
        total += size if replicated else -(-size // tp)
    return total


def launch(args) -> int:
    """Check that the run fits in memory, then exec torchrun on this script."""
    import logging

    from mftune.checkpoint.safetensors_io import read_metadata
    from mftune.models.config import LlamaConfig

    logging.getLogger("mftune").setLevel(logging.WARNING)
    path = os.path.abspath(args.checkpoint)
    meta = read_metadata(path).get("model_config") or {}
    if not isinstance(meta.get("num_layers"), int) or meta["num_layers"] < args.layers:
        print(f"{path} holds a model with num_layers={meta.get('num_layers')}; pass --layers "
              f"{meta.get('num_layers')} or less (or make a checkpoint with --layers {args.layers})",
              file=sys.stderr)
        return 2
    if meta["num_layers"] > args.layers:  # the first layers only; load_checkpoint warns about the rest
        print(f"note: loading the first {args.layers} of the checkpoint's {meta['num_layers']} layers")
    model_config = LlamaConfig.from_dict(load_cfg(args, path).model.model_config)
    share = estimate_share(args, model_config)
    need = args.ranks * (share + PER_RANK_OVERHEAD_GUESS) + 0.3 * GB  # + torchrun itself
    avail = mem_available()
    print(f"estimate: {args.ranks} ranks x ({share / GB:.2f} GB share + "
          f"{PER_RANK_OVERHEAD_GUESS / GB:.1f} GB) + torchrun = {need / GB:.1f} GB; "
          f"MemAvailable {avail / GB:.1f} GB", flush=True)
    if need > avail and not args.force:
        print(f"refused: the {args.ranks} ranks would not fit in the available memory "
              f"({need / GB:.1f} GB needed, {avail / GB:.1f} GB available). Free memory, use "
              f"--vocab-emb-dp False (vocab-parallel embedding/lm_head), or pass --force.",
              file=sys.stderr)
        return 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(args.ranks), "--master-addr", "127.0.0.1", "--master-port", str(port),
            os.path.abspath(__file__),
            "--checkpoint", path, "--ranks", str(args.ranks), "--layers", str(args.layers),
            "--vocab-emb-dp", str(args.vocab_emb_dp)]
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)  # replaces this process: its memory is not held during the run


# ---------------------------------------------------------------------------------- worker

def _block_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    size = -(-n // parts)
    return min(index * size, n), min((index + 1) * size, n)


def verify_slices(model, path: str, tp_rank: int, tp: int, vocab_emb_dp: bool) -> list[str]:
    """Compare local blocks with the file's raw bytes (numpy memmap), block bounds computed here from
    the Megatron layout: column-parallel rows, row-parallel columns, embedding/lm_head rows when
    vocab-parallel, norms whole. First and last layer; 1024-row chunks to keep memory low."""
    import numpy as np
    import torch

    from mftune.parallel.layout import local

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data_start = 8 + n
    params = dict(model.named_parameters())
    last = model.config.num_layers - 1
    names = ["model.tok_embeddings.embedding_weight", "lm_head.weight", "model.norm_out.weight"]
    for i in sorted({0, last}):
        names += [f"model.layers.{i}.{m}" for m in
                  ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                   "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                   "attention_norm.weight", "ffn_norm.weight")]
    checked = []
    for name in names:
        entry = header[name]
        shape = tuple(entry["shape"])
        whole = np.memmap(path, dtype=np.int16, mode="r", offset=data_start + entry["data_offsets"][0],
                          shape=shape)
        rows, cols = (0, shape[0]), (0, shape[1]) if len(shape) == 2 else None
        if name.endswith(("wo.weight", "w2.weight")):
            cols = _block_bounds(shape[1], tp, tp_rank)
        elif name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or (
                not vocab_emb_dp and ("embedding" in name or "lm_head" in name)):
            rows = _block_bounds(shape[0], tp, tp_rank)
        mine = local(params[name].detach())
        want_shape = (rows[1] - rows[0],) + ((cols[1] - cols[0],) if cols else ())
        if tuple(mine.shape) != want_shape:
            raise AssertionError(f"{name}: local shape {tuple(mine.shape)}, expected {want_shape}")
        mine = mine.view(torch.int16).numpy()
        for r in range(rows[0], rows[1], 1024):
            r_end = min(r + 1024, rows[1])
            ref = whole[r:r_end] if cols is None else whole[r:r_end, cols[0]:cols[1]]
            if not np.array_equal(mine[r - rows[0]:r_end - rows[0]], ref):
                raise AssertionError(f"{name}: rows {r}..{r_end} of this rank's block differ from the file")
        del whole
        checked.append(name)
    return checked


def _timed(fn, spent: list[float], clock):
    """``fn`` wrapped to add the ``clock()`` time each call takes to ``spent[0]``."""
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += clock() - start
    return wrapper


def _time_reads() -> list[float]:
    """A one-element list that accumulates the CPU time (user + system) spent in ``read_block`` on
    safetensors files from now on (wrapped where the entries call it)."""
    from mftune.checkpoint import entries

    spent = [0.0]
    entries.read_block = _timed(entries.read_block, spent, time.process_time)
    return spent


def _time_checks() -> list[float]:
    """A one-element list that accumulates the CPU time of this thread spent checking checksums from now on:
    hashing the bytes read (``RangeCheck``, with the partial chunks it reads at a block's ends) and the reads and
    hashes of the chunks a column block owns (``TensorSums.check_chunks``)."""
    from mftune.checkpoint import checksum

    spent = [0.0]
    for cls, names in ((checksum.RangeCheck, ("__init__", "feed", "finish")), (checksum.TensorSums, ("check_chunks",))):
        for name in names:
            setattr(cls, name, _timed(getattr(cls, name), spent, time.thread_time))
    return spent


def worker(args) -> int:
    t_proc = time.perf_counter()
    import logging

    import torch.distributed as dist

    from mftune.models.config import LlamaConfig
    from mftune.parallel.layout import local
    from mftune.parallel.mesh import env_world, init_distributed, layout_errors
    from mftune.trainer.build import build_model

    logging.basicConfig(level=logging.WARNING)
    read_cpu, check_cpu = _time_reads(), _time_checks()
    cfg = load_cfg(args, os.path.abspath(args.checkpoint))
    model_config = LlamaConfig.from_dict(cfg.model.model_config)
    errors = layout_errors(cfg.parallel_config, model_config, env_world())
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    dist_info = init_distributed(cfg.parallel_config)
    dist.barrier()
    base = proc_status()  # torch + mftune imported, gloo process group and mesh up; no model yet
    sampler = PeakSampler()
    sampler.start()
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model(cfg, model_config, dist_info).model
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    sampler.stop.set()
    sampler.join()
    after = proc_status()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    share = share_lora = full = 0
    dtypes = {}
    for name, p in model.named_parameters():
        t = local(p)
        size = t.numel() * t.element_size()
        share += size
        full += p.numel() * t.element_size()  # the whole (global) tensor
        if "lora" in name:
            share_lora += size
        dtype = str(t.dtype).replace("torch.", "")
        dtypes[dtype] = dtypes.get(dtype, 0) + size
    tp_rank = dist_info.mesh.get_local_rank("tp")
    try:
        checked = verify_slices(model, os.path.abspath(args.checkpoint), tp_rank, dist_info.tp_size,
                                cfg.parallel_config.vocab_emb_dp)
        verified = f"ok ({len(checked)} tensors)"
    except AssertionError as exc:
        verified = f"FAILED: {exc}"
    row = {"rank": dist_info.rank, "share": share, "full_model": full, "share_lora": share_lora,
           "dtypes": dtypes,
           "baseline_rss": base["VmRSS"], "baseline_hwm": base["VmHWM"],
           "baseline_anon": base["RssAnon"], "baseline_file": base["RssFile"],
           "peak": after["VmHWM"], "ru_maxrss": ru_maxrss, "rss_after": after["VmRSS"],
           "anon_after": after["RssAnon"], "file_after": after["RssFile"],
           "max_anon_sampled": sampler.anon, "max_file_sampled": sampler.file,
           "load_s": load_s, "load_cpu_s": load_cpu_s, "read_cpu_s": read_cpu[0],
           "check_cpu_s": check_cpu[0], "proc_s": time.perf_counter() - t_proc, "verified": verified}
    rows = [None] * dist_info.world_size
    dist.all_gather_object(rows, row)
    if dist_info.rank == 0:
        report(rows, args, cfg)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all(r["verified"].startswith("ok") for r in rows) else 1


def report(rows: list[dict], args, cfg) -> None:
    ckpt = os.path.getsize(os.path.abspath(args.checkpoint))
    g = lambda b: f"{b / GB:6.2f}"  # noqa: E731
    pc = cfg.parallel_config
    print(f"\nLoad of {args.checkpoint} ({ckpt / GB:.2f} GB, {args.layers} layers) on {len(rows)} CPU "
          f"ranks: data_parallel {pc.data_parallel}, model_parallel {pc.model_parallel}, vocab_emb_dp "
          f"{pc.vocab_emb_dp}, LoRA {cfg.model.model_config['pet_config']['target_modules']} rank "
          f"{cfg.model.model_config['pet_config']['lora_rank']}, bf16 base weights, fp32 LoRA")
    print("GB = 1e9 bytes. share = bytes of the rank's local parameters; peak = VmHWM (= ru_maxrss); "
          "baseline = RSS after import torch + process group, before the model; "
          "extra = peak - share - baseline")
    print(f"{'rank':>4} {'share':>6} {'base':>6} {'peak':>6} {'peak/share':>10} {'peak-share':>10} "
          f"{'extra':>6} {'ru_maxrss':>9} {'rss_now':>7} {'anon_max':>8} {'file_max':>8} "
          f"{'load_s':>6}  slices")
    for r in rows:
        print(f"{r['rank']:>4} {g(r['share'])} {g(r['baseline_rss'])} {g(r['peak'])} "
              f"{r['peak'] / r['share']:>10.2f} {g(r['peak'] - r['share']):>10} "
              f"{g(r['peak'] - r['share'] - r['baseline_rss'])} {g(r['ru_maxrss']):>9} "
              f"{g(r['rss_after']):>7} {g(r['max_anon_sampled']):>8} {g(r['max_file_sampled']):>8} "
              f"{r['load_s']:>6.1f}  {r['verified']}")
    worst = max(rows, key=lambda r: r["peak"] - 1.5 * r["share"] - r["baseline_rss"])
    overhead = max(r["peak"] - r["share"] for r in rows)
    base = max(r["baseline_rss"] for r in rows)
    print(f"\nbaseline RSS (fixed overhead: python + torch + mftune imports + gloo): "
          f"{min(r['baseline_rss'] for r in rows) / GB:.2f}-{base / GB:.2f} GB "
          f"(anon {rows[0]['baseline_anon'] / GB:.2f}, file-backed {rows[0]['baseline_file'] / GB:.2f} "
          f"on rank 0)")
    print(f"max overhead peak - share: {overhead / GB:.2f} GB; LoRA part of the share: "
          f"{rows[0]['share_lora'] / GB:.3f} GB; dtypes (rank 0): "
          + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in rows[0]["dtypes"].items()))
    ok = all(r["peak"] <= 1.5 * r["share"] + r["baseline_rss"] for r in rows)
    print(f"goal peak <= 1.5 x share + baseline: {'holds' if ok else 'does NOT hold'} (worst rank "
          f"{worst['rank']}: peak {worst['peak'] / GB:.2f} GB vs 1.5 x {worst['share'] / GB:.2f} + "
          f"{worst['baseline_rss'] / GB:.2f} = {(1.5 * worst['share'] + worst['baseline_rss']) / GB:.2f} GB)")
    mean_peak = sum(r["peak"] for r in rows) / len(rows)
    naive = rows[0]["full_model"]  # every parameter whole: base bf16 + LoRA fp32
    print(f"naive per-rank load (safetensors.torch.load_file / from_pretrained: the whole model in every "
          f"process) holds >= {naive / GB:.2f} GB of parameters per rank "
          f"({len(rows) * naive / GB:.1f} GB for {len(rows)} ranks) plus the same baseline; ours: mean peak "
          f"{mean_peak / GB:.2f} GB per rank = "
          f"{mean_peak / naive:.3f} x the naive parameters alone, {mean_peak / (naive + base):.3f} x naive + "
          f"baseline ({sum(r['peak'] for r in rows) / GB:.1f} GB summed peaks)")
    verified = all(r["verified"].startswith("ok") for r in rows)
    print("slices verified" if verified else "slice verification FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint_bytes": ckpt, "rows": rows}, f, indent=1)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-checkpoint", metavar="PATH", help="write a random bf16 checkpoint and exit")
    mode.add_argument("--checkpoint", metavar="PATH", help="load it on --ranks ranks and report memory")
    parser.add_argument("--layers", type=int, default=32, help="num_layers (default 32: Llama2-7B)")
    parser.add_argument("--ranks", type=int, default=8, help="ranks = model_parallel (default 8)")
    parser.add_argument("--vocab-emb-dp", type=_bool, default=True,
                        help="True (the 7B YAML's value): embedding and lm_head replicated on every rank; "
                             "False: split over the vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run even if the memory estimate does not fit")
    parser.add_argument("--json", metavar="PATH", help="also write the per-rank figures as JSON (rank 0)")
    args = parser.parse_args()
    if args.make_checkpoint:
        return make_checkpoint(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return worker(args)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
