"""mftune's checkpoint engine against torch.distributed.checkpoint (DCP), measured in one run.

    python bench/dcp_compare.py                                  # hidden 1024, 8 layers, vocab 32000 (0.68 GB fp32)
    python bench/dcp_compare.py --hidden 2048 --layers 16        # bigger
    python bench/dcp_compare.py --layers 2 --vocab 4000 --repeats 1   # smoke (~1 min)
    python bench/dcp_compare.py --mftune-root /tmp/snap          # mftune imported from a snapshot directory
    python bench/dcp_compare.py --cold                           # evict the checkpoint files from the page cache
                                                                 # (posix_fadvise DONTNEED) before every step

What it does (CPU, gloo, every step a separate process so that peak RSS is its own):
  gen        a random Llama (``mftune.LlamaForCausalLM``, fp32) -> ``source.safetensors``: the reference
             every loaded tensor is compared with, bit for bit
  save       the same tensors written by ``mftune.checkpoint.save_complete`` (one complete file), by
             ``dcp.save(no_dist=True)`` (FileSystemWriter: ``__0_0.distcp`` + pickled ``.metadata``) and by
             DCP's ``HuggingFaceStorageWriter`` (safetensors), each from one process; plus a 4-rank
             save (FSDP2 with every 2-D weight sharded on dim 1, i.e. a *different* layout than the
             target) with DCP's FileSystemWriter and with HuggingFaceStorageWriter(save_distributed=True)
  part 1     load into a 4-rank FSDP2 model (``fully_shard`` per decoder layer + root, dp=4, Shard(0),
             meta build -> fully_shard -> ``to_empty``), torchrun, gloo:
               mftune  ``load_checkpoint(model, file)`` (each rank preads its rows)
               DCP     ``dcp.load(model.state_dict(), ...)`` from each DCP checkpoint above
             and again into a 2x2 layout (torch's ColwiseParallel/RowwiseParallel plan on tp=2, then
             FSDP2 on dp=2; skip with --no-tp). Per approach: load seconds (the first load and the best
             of --repeats, each the max over ranks), peak RSS per rank (ru_maxrss; VmHWM growth during the
             load after resetting it via /proc/self/clear_refs; peak private RssAnon growth, sampled),
             bytes read per rank through read syscalls (/proc/self/io rchar; mmap reads are not counted),
             the torch.distributed collectives issued during the load and the seconds spent in them
             (counted by wrapping the torch.distributed functions), and whether every parameter's local
             shard equals the source bit for bit (block bounds from torch's
             ``compute_local_shape_and_global_offset``, not from mftune). The model's shards are faulted in
             (zeroed) before the load, so memory growth is the loader's own overhead.
  part 2     offline, one process, torch.distributed NOT initialised (no process group):
             extract rank --rank's dp=4 block (rows) of every tensor:
               mftune        ``mftune.checkpoint.safetensors_io.read_block``: header parsed once, os.preadv of the rows
               safe_open     ``safetensors.safe_open(...).get_slice(name)[rows]`` (same file)
               DCP keys      ``_load_state_dict_from_keys({name})`` one tensor at a time, then slice
               DCP planner   ``dcp.load(no_dist=True)`` with a LoadPlanner asking only for the block
                             (``create_read_items_for_chunk_list``; private helpers), FileSystemReader and
                             HuggingFaceStorageReader
             and the whole model into one process: mftune ``load_checkpoint`` vs ``dcp.load(no_dist=True)``
  part 3     format facts read from the files: which files DCP writes, whether ``.metadata`` is a pickle
             (pickletools), what a ``.distcp`` item is (torch.save zip), whether ``safetensors.safe_open``
             reads DCP's output, what HuggingFaceStorageWriter's headers record; with the torch source
             lines (file:line of the installed torch) that do it

Prints one table per part with ratios DCP / mftune (this row / the table's mftune row), then the facts.
OMP_NUM_THREADS=1 in every worker. Saves run --repeats times after an os.sync() (best reported; fsync
timings on a shared VM are noisy). From mftune: LlamaForCausalLM (built from a LlamaConfig dict),
mftune.checkpoint.load_checkpoint and save_complete, and mftune.checkpoint.safetensors_io.read_block
(the offline block reader).
The files stay in --workdir (default: a temporary directory, removed at the end unless --keep).

This file is the driver: it starts every step as ``python bench/dcp_tasks.py TASK ...`` (under
torchrun for the 4-rank ones), collects the JSON each writes to <workdir>/results/, prints the tables
and reads the format facts. bench/dcp_tasks.py holds the steps and the meters.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from dcp_tasks import LOAD_SOURCES, WORLD, add_model_args, row_block, source_shapes, worker_argv  # noqa: E402
from parity import free_port  # noqa: E402  (standard library only)

GB = 1e9
MB = 1e6
MB_FLOOR = 5 * MB  # memory ratios against less than this print "-" (noise)
DCP_DIRS = ("dcp_full", "dcp_sharded", "hf_full", "hf_sharded")

# ----------------------------------------------------------------------------------------------
# running the steps (each in its own process)


def _evict(workdir: str) -> None:
    """Drop the checkpoint files' clean pages from the page cache (no root needed)."""
    for dirpath, _, files in os.walk(workdir):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _run(args, task: str, source: str = "", ranks: int = 1) -> list[dict]:
    """Run one step (bench/dcp_tasks.py) on ``ranks`` processes; every rank's result."""
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + worker_argv(args, task, source)
    else:
        cmd = [sys.executable] + worker_argv(args, task, source)
    if args.cold:
        _evict(args.workdir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "LOGLEVEL": "WARNING"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"{task} {source} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    print(f"  {task:<18} {source:<12} {time.perf_counter() - t0:6.1f} s (process)", flush=True)
    out = []
    for r in range(ranks):
        with open(os.path.join(args.workdir, "results", f"{task}.{source or '-'}.{r}.json")) as f:
            out.append(json.load(f))
    return out


def _measure(args) -> dict:
    """Every step, in order: generate, save, part 1 (4 ranks), part 2 (offline)."""
    gen = _run(args, "gen")[0]
    print(f"  model: {gen['tensors']} tensors, {gen['bytes'] / GB:.3f} GB fp32", flush=True)
    r = {"gen": gen}
    r["saves"] = {k: _run(args, f"save_{k}")[0] for k in ("mftune", "dcp", "hf")}
    r["sharded"] = _run(args, "save_sharded", ranks=WORLD)
    r["loads"] = {k: _run(args, "load", k, ranks=WORLD) for k in LOAD_SOURCES}
    r["loads_tp"] = {} if args.no_tp else {k: _run(args, "load", k + "@tp", ranks=WORLD)
                                           for k in ("mftune", "dcp_full", "dcp_sharded", "hf_full")}
    blocks = {"pread": _run(args, "block_pread")[0], "safeopen": _run(args, "block_safeopen")[0]}
    for src in ("dcp_full", "dcp_sharded"):
        blocks[f"keys:{src}"] = _run(args, "block_dcp_keys", src)[0]
    for src in DCP_DIRS:
        blocks[f"planner:{src}"] = _run(args, "block_dcp_planner", src)[0]
    r["blocks"] = blocks
    r["fulls"] = {k: _run(args, "full_offline", k)[0] for k in LOAD_SOURCES}
    return r


# ----------------------------------------------------------------------------------------------
# tables


def _fmt_gb(x):
    return "-" if x is None else f"{x / GB:.2f}"


def _fmt_mb(x):
    return "-" if x is None else f"{x / MB:.0f}"


def _ratio(a, b, floor=1e-3):
    return "-" if a is None or not b or b < floor else f"{a / b:.2f}x"


def _coll(calls: dict) -> str:
    n = sum(calls.values())
    return "0" if not n else f"{n} (" + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) + ")"


def _rows_bytes(args) -> int:
    """Bytes of rank ``args.rank``'s row block of every tensor of source.safetensors."""
    total = 0
    for shape, dtype in source_shapes(args.workdir).values():
        lo, hi = row_block(shape[0], args.rank)
        n = hi - lo
        for d in shape[1:]:
            n *= d
        total += n * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    return total


COLUMNS = [
    "Columns: s = wall seconds of the measured call; peak = ru_maxrss of that process (GB); grow = VmHWM during",
    "the call minus RSS before it (MB, kernel-exact; includes file pages an mmap reader touches); anon = peak",
    "private memory (RssAnon, sampled every 5 ms) minus before (MB); read = MB through read syscalls (rchar; mmap",
    "reads not counted: 'mmap'); ratio = this row / the mftune row of the same table ('-' when that is < 5 MB).",
]
SAVE_LABELS = {"mftune": "mftune save_complete (1 file)", "dcp": "dcp.save no_dist (FileSystemWriter)",
               "hf": "dcp.save no_dist (HuggingFaceStorageWriter)"}
SHARDED_SAVE_LABELS = {"dcp": "dcp.save 4 ranks Shard(1) (FileSystemWriter)",
                       "hf": "dcp.save 4 ranks Shard(1) (HF, distributed)"}
LOAD_LABELS = {"mftune": "mftune load_checkpoint (complete file)",
               "dcp_full": "DCP dcp.load (saved by 1 process)",
               "dcp_sharded": "DCP dcp.load (saved 4 ranks, Shard(1))",
               "hf_full": "DCP HF reader (saved by 1 process)",
               "hf_sharded": "DCP HF reader (saved 4 ranks, Shard(1))"}
BLOCK_LABELS = {"pread": "mftune read_block: header + preadv of the rows",
                "safeopen": "safetensors safe_open get_slice (mftune file)",
                "keys:dcp_full": "DCP _load_state_dict_from_keys per key (1-proc)",
                "keys:dcp_sharded": "DCP _load_state_dict_from_keys per key (4-rank)",
                "planner:dcp_full": "DCP no_dist + block planner (1-proc)",
                "planner:dcp_sharded": "DCP no_dist + block planner (4-rank)",
                "planner:hf_full": "DCP HF reader + block planner (1-proc)",
                "planner:hf_sharded": "DCP HF reader + block planner (4-rank)"}
FULL_LABELS = {"mftune": "mftune load_checkpoint (complete file)",
               "dcp_full": "DCP dcp.load no_dist (1-proc)", "dcp_sharded": "DCP dcp.load no_dist (4-rank)",
               "hf_full": "DCP HF reader no_dist (1-proc)", "hf_sharded": "DCP HF reader no_dist (4-rank)"}
OFFLINE_HEADER = (f"{'reader':<50}{'s':>7}{'ratio':>8}{'peak':>6}{'grow':>6}{'anon':>6}{'ratio':>7}{'read':>7}"
                  f"{'bitwise':>8}{'pg':>4}")


def _save_table(args, r) -> list[str]:
    saves, sharded = r["saves"], r["sharded"]
    lines = [f"== Saves (one process; the {r['gen']['bytes'] / GB:.2f} GB state dict already in private memory) ==",
             f"   s = best of {args.repeats} saves in the process (os.sync() before each, fsync inside: noisy); "
             f"memory of the first save",
             f"{'writer':<46}{'s':>7}{'ratio':>8}{'peak':>7}{'grow':>7}{'anon':>7}  all runs (s)"]
    ref = min(saves["mftune"]["runs"])
    for key, label in SAVE_LABELS.items():
        s = saves[key]
        lines.append(f"{label:<46}{min(s['runs']):7.2f}{_ratio(min(s['runs']), ref):>8}{_fmt_gb(s['ru_maxrss']):>7}"
                     f"{_fmt_mb(s['growth']):>7}{_fmt_mb(s['anon_growth']):>7}  "
                     + ", ".join(f"{x:.2f}" for x in s["runs"]))
    for key, label in SHARDED_SAVE_LABELS.items():
        worst = {m: max(s[key][m] or 0 for s in sharded) for m in ("seconds", "ru_maxrss", "growth", "anon_growth")}
        lines.append(f"{label:<46}{worst['seconds']:7.2f}{'':>8}{_fmt_gb(worst['ru_maxrss']):>7}"
                     f"{_fmt_mb(worst['growth']):>7}{_fmt_mb(worst['anon_growth']):>7}  "
                     f"collectives/rank {_coll(sharded[0][key]['collectives'])}")
    return lines


def _load_rows(results: dict) -> list[str]:
    """One row per source: every column the worst rank; ratios against the first (mftune) row."""
    lines, base = [], None
    for key, rows in results.items():
        runs = [max(r["runs"][i] for r in rows) for i in range(len(rows[0]["runs"]))]
        t = min(runs)
        coll_best = max(r["coll_seconds"][runs.index(t)] for r in rows)
        anon = max(r["anon_growth"] for r in rows)
        base = base or (t, anon, runs[0])
        read = "mmap" if key.startswith("hf") else f"{max(r['read_bytes'] for r in rows) / MB:.0f}"
        lines.append(f"{LOAD_LABELS[key]:<41}{runs[0]:8.2f}{_ratio(runs[0], base[2]):>7}{t:8.2f}{_ratio(t, base[0]):>7}"
                     f"{_fmt_gb(max(r['ru_maxrss'] for r in rows)):>6}{_fmt_mb(max(r['growth'] or 0 for r in rows)):>6}"
                     f"{_fmt_mb(anon):>6}{_ratio(anon, base[1], MB_FLOOR):>7}{read:>7}"
                     f"{str(all(r['bitwise'] for r in rows)):>8}{coll_best:7.2f}  {_coll(rows[0]['collectives'])}")
    return lines


def _load_table(args, r) -> list[str]:
    cold = " (cold: files evicted before the process)" if args.cold else ""
    lines = [f"== Part 1: load into a {WORLD}-rank FSDP2 model (dp={WORLD}, Shard(0); "
             f"{r['gen']['bytes'] / GB / WORLD:.2f} GB per rank), torchrun, gloo; every column: the worst rank ==",
             "   coll s = seconds inside those collectives in the best load (worst rank; includes waiting for slower ranks)",
             f"   s first = the first load in the process{cold}; "
             f"s best = best of {args.repeats} loads (each the max over ranks)",
             f"{'source -> 4-rank FSDP2':<41}{'s first':>8}{'ratio':>7}{'s best':>8}{'ratio':>7}{'peak':>6}{'grow':>6}"
             f"{'anon':>6}{'ratio':>7}{'read':>7}{'bitwise':>8}{'coll s':>7}  collectives per rank during the load"]
    lines += _load_rows(r["loads"])
    if r["loads_tp"]:
        lines.append(f"-- target 2x2: tensor parallel (Colwise/Rowwise plan) on tp=2, then FSDP2 on dp=2; placements "
                     f"{r['loads_tp']['mftune'][0]['placements']}")
        lines += _load_rows(r["loads_tp"])
    return lines


def _offline_table(title: str, results: dict, labels: dict, ref: dict) -> list[str]:
    """Part 2 or 2b: one process each; ratios against ``ref`` (the mftune row)."""
    lines = [title, OFFLINE_HEADER]
    for key, r in results.items():
        read = "mmap" if key in ("safeopen", "planner:hf_full", "planner:hf_sharded") or key.startswith("hf") \
            else f"{r['read_bytes'] / MB:.0f}"
        lines.append(f"{labels[key]:<50}{r['seconds']:7.2f}{_ratio(r['seconds'], ref['seconds']):>8}"
                     f"{_fmt_gb(r['ru_maxrss']):>6}{_fmt_mb(r['growth']):>6}{_fmt_mb(r['anon_growth']):>6}"
                     f"{_ratio(r['anon_growth'], ref['anon_growth'], MB_FLOOR):>7}"
                     f"{read:>7}{str(r['bitwise']):>8}{'yes' if r['process_group'] else 'no':>4}")
    return lines


def _report(args, r, facts: list[str]) -> list[str]:
    part2 = (f"== Part 2: offline, one process, torch.distributed not initialised: rank {args.rank}'s dp={WORLD} "
             f"block (rows) of every tensor ({_rows_bytes(args) / GB:.2f} GB of output, counted in grow/anon) ==")
    part2b = ("== Part 2b: offline, one process, torch.distributed not initialised: the whole model "
              "(parameters pre-touched) ==")
    return ([""] + COLUMNS + [""] + _save_table(args, r) + [""] + _load_table(args, r) + [""]
            + _offline_table(part2, r["blocks"], BLOCK_LABELS, r["blocks"]["pread"]) + [""]
            + _offline_table(part2b, r["fulls"], FULL_LABELS, r["fulls"]["mftune"]) + [""]
            + [f"4-rank save placements: {r['sharded'][0]['placements']}; "
               f"load target placements: {r['loads']['mftune'][0]['placements']}", ""]
            + ["== Part 3: format facts (read from the files written above) =="] + ["- " + f for f in facts])


# ----------------------------------------------------------------------------------------------
# part 3: format facts


def _dir_files(path: str) -> list[tuple[str, int]]:
    out = []
    for dirpath, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, path), os.path.getsize(full)))
    return sorted(out)


def _torch_line(relpath: str, needle: str) -> str:
    """'<torch dir>/<relpath>:<line>' of the first line containing ``needle`` in the installed torch."""
    import torch
    full = os.path.join(os.path.dirname(torch.__file__), relpath)
    try:
        with open(full) as f:
            for i, line in enumerate(f, 1):
                if needle in line:
                    return f"{full}:{i}"
    except OSError:
        pass
    return f"{full} (not found: {needle!r})"


def _file_facts(w: str) -> list[str]:
    import torch
    facts = [f"torch {torch.__version__} at {os.path.dirname(torch.__file__)}"]
    for d in DCP_DIRS:
        facts.append(f"{d}/ files: " + ", ".join(f"{n} ({s / MB:.1f} MB)" for n, s in _dir_files(os.path.join(w, d))))
    facts.append(f"mftune.safetensors: {os.path.getsize(os.path.join(w, 'mftune.safetensors')) / MB:.1f} MB, "
                 f"source.safetensors: {os.path.getsize(os.path.join(w, 'source.safetensors')) / MB:.1f} MB")
    return facts


def _metadata_facts(w: str) -> list[str]:
    """What DCP's .metadata is: a pickle, and which classes unpickling it imports."""
    with open(os.path.join(w, "dcp_full", ".metadata"), "rb") as f:
        raw = f.read()
    globals_ = set()

    class _Recorder(pickle.Unpickler):  # records every class the unpickler imports (our own file)
        def find_class(self, module, name):
            globals_.add(f"{module}.{name}")
            return super().find_class(module, name)

    ops = sum(1 for _ in pickletools.genops(raw))
    _Recorder(io.BytesIO(raw)).load()
    is_proto = raw[:1] == b"\x80"
    proto = raw[1] if is_proto else None
    return [f"dcp_full/.metadata: {len(raw)} bytes, starts with PROTO opcode 0x80 = {is_proto} "
            f"(pickle protocol {proto}); pickletools.genops parses it ({ops} opcodes); classes unpickling imports: "
            + ", ".join(sorted(globals_)),
            "  read with pickle.load (not weights_only): "
            + _torch_line("distributed/checkpoint/filesystem.py", "metadata = pickle.load(metadata_file)")]


def _zip_has_pkl(path: str) -> bool:
    with open(path, "rb") as f:
        return b"data.pkl" in f.read(1 << 20)


def _distcp_facts(w: str) -> list[str]:
    """What a .distcp file is (torch.save zips) and whether safe_open reads it."""
    from safetensors import safe_open
    name = [n for n, _ in _dir_files(os.path.join(w, "dcp_full")) if n.endswith(".distcp")][0]
    path = os.path.join(w, "dcp_full", name)
    with open(path, "rb") as f:
        head = f.read(4)
    facts = [f"dcp_full/{name} starts with {head!r} (zip = torch.save archive per item, "
             f"data.pkl inside: {_zip_has_pkl(path)}); read back item by item "
             "with torch.load(weights_only=True) of the whole stored chunk, then narrowed: "
             + _torch_line("distributed/checkpoint/filesystem.py", "torch.load(")
             + " and " + _torch_line("distributed/checkpoint/filesystem.py", "tensor = narrow_tensor_by_index(")]
    try:
        with safe_open(path, framework="pt") as f:
            facts.append(f"safetensors.safe_open reads {name}: yes ({len(list(f.keys()))} keys)")
    except Exception as exc:  # noqa: BLE001
        facts.append(f"safetensors.safe_open on {name}: fails: {type(exc).__name__}: {str(exc)[:120]}")
    return facts


def _hf_facts(w: str) -> list[str]:
    """What HuggingFaceStorageWriter's files record (the last rank's file of each directory)."""
    from safetensors import safe_open
    from torch.distributed import checkpoint as dcp_mod
    facts = [f"torch.distributed.checkpoint.HuggingFaceStorageWriter exists: "
             f"{hasattr(dcp_mod, 'HuggingFaceStorageWriter')} "
             f"({_torch_line('distributed/checkpoint/hf_storage.py', 'class HuggingFaceStorageWriter')}); "
             f"_HuggingFaceStorageWriter: {hasattr(dcp_mod, '_HuggingFaceStorageWriter')}"]
    for d in ("hf_full", "hf_sharded"):
        name = [n for n, _ in _dir_files(os.path.join(w, d)) if n.endswith(".safetensors")][-1]
        with safe_open(os.path.join(w, d, name), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            sample = keys[0]
            info = json.loads(meta.get("DCP_SHARDING_INFO", "{}")).get(sample)
            shape = f.get_slice(sample).get_shape()
        facts.append(f"{d}/{name}: safe_open reads it ({len(keys)} keys); header metadata keys {sorted(meta)}; "
                     f"{sample}: stored shape {shape}, DCP_SHARDING_INFO {info} (offsets only, no global shape)")
    return facts


TORCH_FACTS = [  # (what, [(file under torch/distributed/checkpoint, the line that does it)])
    ("HF reader rebuilds each tensor's global size as max(offset + shape) over every file's header",
     [("hf_storage.py", "size[i] = max(size[i], shape[i] + offset[i])")]),
    ("HF writer with save_distributed and no consolidation writes no index/metadata file",
     [("hf_storage.py", "if self.save_distributed and not self.enable_consolidation")]),
    ("HF writer serialises each file in memory (safetensors.torch.save -> bytes) before writing",
     [("filesystem.py", "from safetensors.torch import save")]),
    ("DCP load with a process group: plan via reduce_scatter (gather_object + scatter_object_list), "
     "then all_gather_object after the reads",
     [("state_dict_loader.py", 'central_plan = distW.reduce_scatter("plan"'),
      ("state_dict_loader.py", '_ = distW.all_gather("read", read_data)')]),
    ("no_dist=True (or no initialised process group) loads in one process",
     [("state_dict_loader.py", "no_dist = no_dist or (not dist.is_available())")]),
]


def format_facts(args) -> list[str]:
    w = args.workdir
    facts = _file_facts(w) + _metadata_facts(w) + _distcp_facts(w) + _hf_facts(w)
    for what, where in TORCH_FACTS:
        facts.append(f"  {what}: " + ", ".join(_torch_line("distributed/checkpoint/" + f, needle) for f, needle in where))
    with open(os.path.join(w, "mftune.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n)).get("__metadata__", {})
    facts.append(f"mftune.safetensors header metadata keys: {sorted(meta)} (JSON; no pickle)")
    return facts


# ----------------------------------------------------------------------------------------------
# driver


def driver(args) -> int:
    own_tmp = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="dcp_compare_"))
    os.makedirs(os.path.join(args.workdir, "results"), exist_ok=True)
    for d in DCP_DIRS:
        shutil.rmtree(os.path.join(args.workdir, d), ignore_errors=True)
    t_start = time.perf_counter()
    print(f"workdir {args.workdir}; hidden {args.hidden}, layers {args.layers}, heads {args.heads}, "
          f"vocab {args.vocab}; {WORLD} ranks, gloo, CPU; repeats {args.repeats}; "
          f"{'cold (fadvise DONTNEED before each step)' if args.cold else 'warm page cache'}; "
          f"mftune from {args.mftune_root or ROOT}", flush=True)
    r = _measure(args)
    facts = format_facts(args)
    lines = _report(args, r, facts) + ["", f"total {time.perf_counter() - t_start:.0f} s"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"saves": r["saves"], "sharded_save": r["sharded"], "loads": r["loads"],
                       "loads_tp": r["loads_tp"], "blocks": r["blocks"], "full": r["fulls"], "facts": facts},
                      f, indent=1)
    if own_tmp and not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--no-tp", dest="no_tp", action="store_true", help="skip the 2x2 (dp x tp) load target")
    ap.add_argument("--cold", action="store_true", help="posix_fadvise(DONTNEED) every checkpoint file before each step")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    ap.add_argument("--mftune-root", dest="mftune_root", default=None,
                    help="import mftune from DIR/mftune instead of this checkout (e.g. a `git archive` snapshot)")
    ap.add_argument("--json", default=None, help="also write every raw measurement to this JSON file")
    args = ap.parse_args(argv)
    if args.mftune_root:
        args.mftune_root = os.path.abspath(args.mftune_root)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
