"""What checksums cost on a Llama2-7B-shaped bf16 checkpoint: writing, reading each rank's blocks, loading.

    python bench/checksum_cost.py --workdir /tmp/mftune-cs --layers 4           # 2.3 GB file, ~2 min
    python bench/checksum_cost.py --workdir /tmp/mftune-cs --layers 4 --load    # + bench/load_memory.py twice
    python bench/checksum_cost.py --workdir /tmp/mftune-cs                      # 32 layers: 13.5 GB

Steps (GB = 1e9 bytes; the page cache is warm: every figure is CPU work, not the disk):
  write        the checkpoint with mftune's streaming writer (``write_safetensors_streaming``: header with
               placeholder hashes, tensors hashed as they are written, header rewritten in place), random bf16
               values generated tensor by tensor (load_memory.random_bf16). "hashing" is hash_chunks on the same
               tensors timed on its own, as a share of the writer's time (generation excluded).
  read         in this one process, the blocks each of 8 tensor-parallel ranks reads in the 7B YAML's layout
               (model_parallel 8, vocab_emb_dp True): wq/wk/wv/w1/w3 a row block, wo/w2 a column block,
               embedding, lm_head and norms whole; ``read_block`` into a preallocated buffer, with
               MFTUNE_VERIFY_CHECKSUMS=1 and =0 alternating, best of --repeat; CPU time (user + system). A tensor
               every rank reads whole is checked by one of them, as load_entries does. Columns "full" is the other
               policy for column blocks: every reader checks every chunk of its rows (whole rows read 64 MB at a
               time, hashed, its columns copied out) instead of only the chunks its columns own.
  fingerprint  ``mftune.checkpoint.load.fingerprint`` of this file (carries checksums: size + header) and the
               hash of its bytes that a file without checksums (a Hugging Face download) costs.
  load         (--load) bench/load_memory.py --checkpoint FILE --layers N on 8 torchrun ranks (the trainer's
               build_model), with MFTUNE_VERIFY_CHECKSUMS=1 and =0 alternating: the slowest rank's load_s
               (wall), the ranks' CPU time in build_model summed (what other jobs on the machine change least) and
               the part of it spent in read_block, and the thread CPU time spent in the checks themselves
               (hashing, and the extra reads of owned column chunks and of partial chunks); medians of --repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
GB = 1e9
TP = 8
ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")
COLUMNS = ("wo.weight", "w2.weight")


def make(path: str, layers: int, seed: int) -> None:
    import numpy as np
    import torch

    import load_memory
    from mftune.checkpoint.checksum import hash_chunks
    from mftune.checkpoint.safetensors_io import encode_metadata, tensor_bytes, write_safetensors_streaming
    from mftune.models.config import LlamaConfig

    args = argparse.Namespace(layers=layers, ranks=TP, vocab_emb_dp=True)
    mc = dict(load_memory.load_cfg(args).model.model_config)
    mc.pop("pet_config", None)
    model_config = LlamaConfig.from_dict(mc)
    specs = [(name, torch.bfloat16, shape) for name, shape in load_memory.checkpoint_specs(model_config)]
    rng, spent = np.random.default_rng(seed), {"gen": 0.0, "hash": 0.0}

    def tensors():
        for name, _, shape in specs:
            t0 = time.perf_counter()
            t = load_memory.random_bf16(rng, shape)
            t1 = time.perf_counter()
            hash_chunks(tensor_bytes(t))  # timed on its own: the writer hashes again
            spent["gen"] += t1 - t0
            spent["hash"] += time.perf_counter() - t1
            yield name, t

    start = time.perf_counter()
    size = write_safetensors_streaming(path, specs, tensors(), encode_metadata({"model_config": model_config.to_dict()}))
    total = time.perf_counter() - start
    writer = total - spent["gen"] - spent["hash"]
    print(f"write: {size / GB:.2f} GB in {writer:.2f} s of writer time ({writer / size * GB:.3f} s/GB, fsync "
          f"included; value generation excluded); hashing alone {spent['hash']:.2f} s = {spent['hash'] / size * GB:.3f}"
          f" s/GB = {spent['hash'] / writer:.1%} of the writer's time")


def rank_blocks(path: str) -> dict[str, list[tuple[str, tuple]]]:
    """{kind: [(tensor, block)]} over the 8 ranks: "rows", "columns", "whole" (+ whether this copy is checked)."""
    from mftune.checkpoint.safetensors_io import safetensors_header

    out: dict[str, list] = {"rows": [], "columns": [], "whole": []}
    for name, info in safetensors_header(path)[1].items():
        shape = info["shape"]
        for r in range(TP):
            if name.endswith(ROWS) or name.endswith(COLUMNS):
                dim = 0 if name.endswith(ROWS) else 1
                size = -(-shape[dim] // TP)
                block = [slice(0, n) for n in shape]
                block[dim] = slice(r * size, min((r + 1) * size, shape[dim]))
                out["rows" if dim == 0 else "columns"].append((name, tuple(block)))
            else:  # every rank reads it whole; one of them checks it (load_entries: copy i % ranks)
                out["whole"].append((name, tuple(slice(0, n) for n in shape), r == len(out["whole"]) // TP % TP))
    return out


def read_all(path: str, blocks: list, buf, full_columns: bool = False) -> tuple[float, int]:
    import math

    import torch

    from mftune.checkpoint.safetensors_io import read_block

    from mftune.checkpoint.checksum import skipped

    start, done = time.process_time(), 0  # CPU time (user + system): what other jobs on the machine change least
    for name, block, *checked in blocks:
        shape = [s.stop - s.start for s in block]
        out = buf[:math.prod(shape) * 2].view(torch.bfloat16).view(shape)
        with skipped(checked == [False]):
            (_read_full_columns if full_columns else read_block)(path, name, block, out)
        done += out.numel() * 2
    return time.process_time() - start, done


def _read_full_columns(path: str, key: str, block: tuple, out) -> None:
    """The other column policy: whole rows read 64 MB at a time, every chunk checked, the columns copied out."""
    import torch

    from mftune.checkpoint import safetensors_io as io
    from mftune.checkpoint.checksum import RangeCheck

    start, header, _ = io.safetensors_header(path)
    info = header[key]
    begin, (rows, cols) = start + info["data_offsets"][0], info["shape"]
    sums = io._tensor_sums(path, key, begin, info["data_offsets"][1] - info["data_offsets"][0])
    row = cols * 2
    check = RangeCheck(sums, 0)
    step = io.READ_CHUNK // row
    piece = torch.empty(step, cols, dtype=torch.bfloat16)
    for r in range(0, rows, step):
        part = piece[:min(step, rows - r)]
        io._pread(path, begin + r * row, part, check)
        out[r:r + len(part)] = part[:, block[1]]
    check.finish()


def reads(path: str, repeat: int) -> dict:
    import math

    import torch

    blocks = rank_blocks(path)
    biggest = max(math.prod(s.stop - s.start for s in b) for items in blocks.values() for _, b, *_ in items) * 2
    buf = torch.empty(biggest, dtype=torch.uint8)
    results: dict = {}
    for i in range(repeat):
        for verify in ("1", "0") if i % 2 == 0 else ("0", "1"):
            os.environ["MFTUNE_VERIFY_CHECKSUMS"] = verify
            for kind, items in blocks.items():
                s, n = read_all(path, items, buf)
                best = results.setdefault((kind, verify), (s, n))
                results[(kind, verify)] = min(best, (s, n))
        os.environ["MFTUNE_VERIFY_CHECKSUMS"] = "1"
        s, n = read_all(path, blocks["columns"], buf, full_columns=True)
        results[("columns", "full")] = min(results.get(("columns", "full"), (s, n)), (s, n))
    return results


def report_reads(results: dict) -> None:
    print(f"\nreads of the {TP} ranks' blocks in one process (best of the repeats; delivered bytes):")
    print(f"{'blocks':>8} {'GB':>6} {'checked s':>9} {'s/GB':>6} {'unchecked s':>11} {'s/GB':>6} {'cost':>6}")
    total = {"1": 0.0, "0": 0.0}
    for kind in ("rows", "columns", "whole"):
        (on, n), (off, _) = results[(kind, "1")], results[(kind, "0")]
        total["1"] += on
        total["0"] += off
        print(f"{kind:>8} {n / GB:6.2f} {on:9.3f} {on / n * GB:6.3f} {off:11.3f} {off / n * GB:6.3f} "
              f"{(on - off) / off:+6.1%}")
    full, n = results[("columns", "full")]
    print(f"{'all':>8} {'':>6} {total['1']:9.3f} {'':>6} {total['0']:11.3f} {'':>6} "
          f"{(total['1'] - total['0']) / total['0']:+6.1%}")
    off, all_full = results[("columns", "0")][0], total["1"] - results[("columns", "1")][0] + full
    print(f"columns, every reader checking every chunk of its rows: {full:.3f} s ({full / n * GB:.3f} s/GB "
          f"delivered), {(full - off) / off:+.0%} over unchecked; all blocks then {(all_full - total['0']) / total['0']:+.1%}")


def fingerprints(path: str) -> None:
    from mftune.checkpoint.checksum import content_hash
    from mftune.checkpoint.load import fingerprint

    size = os.path.getsize(path)
    t0 = time.perf_counter()
    fingerprint(path)
    t1 = time.perf_counter()
    content_hash(path)
    t2 = time.perf_counter()
    print(f"\nfingerprint: this file (checksums: size + header) {1000 * (t1 - t0):.1f} ms; the bytes' hash a file "
          f"without checksums needs {t2 - t1:.2f} s = {(t2 - t1) / size * GB:.3f} s/GB "
          f"(a 13.5 GB Llama2-7B download: {(t2 - t1) / size * 13.5 * GB:.1f} s, once per process)")


def loads(path: str, layers: int, repeat: int, workdir: str) -> None:
    import resource

    runs: dict[tuple[str, str], list[float]] = {}
    for i in range(repeat):
        for verify in ("1", "0") if i % 2 == 0 else ("0", "1"):  # ABBA: drift in the machine's load cancels
            out = os.path.join(workdir, f"load_{verify}.json")
            env = dict(os.environ, MFTUNE_VERIFY_CHECKSUMS=verify)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "load_memory.py"), "--checkpoint", path,
                                "--layers", str(layers), "--json", out], env=env, capture_output=True, text=True)
            if r.returncode or "slices verified" not in r.stdout:
                raise SystemExit(f"load_memory.py failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            with open(out) as f:
                rows = json.load(f)["rows"]
            slowest, load_cpu = max(r["load_s"] for r in rows), sum(r["load_cpu_s"] for r in rows)
            read_cpu = sum(r["read_cpu_s"] for r in rows)
            check_cpu = sum(r.get("check_cpu_s", 0.0) for r in rows)
            check_share = max(r.get("check_cpu_s", 0.0) / r["load_cpu_s"] for r in rows)
            print(f"  load {i + 1} verify={verify}: slowest rank {slowest:.2f} s wall; CPU summed over the ranks: "
                  f"build_model {load_cpu:.2f} s, of which read_block {read_cpu:.2f} s; the whole run (start-up, slice "
                  f"check) {used:.1f} s; in the checks themselves {check_cpu:.2f} s (at most {check_share:.1%} of a "
                  f"rank's build_model CPU)", flush=True)
            for key, value in (("wall", slowest), ("cpu", load_cpu), ("read", read_cpu), ("check", check_cpu),
                               ("share", check_share)):
                runs.setdefault((key, verify), []).append(value)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    extra = med[("read", "1")] - med[("read", "0")]
    print(f"load (bench/load_memory.py, {TP} ranks, build_model; medians of {repeat}): wall checked "
          f"{med[('wall', '1')]:.2f} s vs unchecked {med[('wall', '0')]:.2f} s ({med[('wall', '1')] / med[('wall', '0')] - 1:+.1%});"
          f" CPU summed over the ranks {med[('cpu', '1')]:.2f} s vs {med[('cpu', '0')]:.2f} s "
          f"({med[('cpu', '1')] / med[('cpu', '0')] - 1:+.1%}); of it in read_block {med[('read', '1')]:.2f} s vs "
          f"{med[('read', '0')]:.2f} s: the checks' {extra:.2f} s are {extra / med[('cpu', '0')]:+.1%} of the load's CPU")
    print(f"the checks measured inside the checked loads (thread CPU time of hashing and of the extra chunk reads): "
          f"{med[('check', '1')]:.2f} s summed over the ranks = {med[('check', '1')] / med[('cpu', '1')]:.1%} of the "
          f"load's CPU; the largest share on one rank {med[('share', '1')]:.1%} of its build_model CPU")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--layers", type=int, default=32, help="num_layers (default 32: Llama2-7B)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", action="store_true", help="also run bench/load_memory.py with and without checks")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(args.workdir), f"llama2_7b_{args.layers}layers_bf16.safetensors")
    if not os.path.exists(path):
        make(path, args.layers, args.seed)
    print(f"checkpoint {path}: {os.path.getsize(path) / GB:.2f} GB")
    report_reads(reads(path, args.repeat))
    fingerprints(path)
    if args.load:
        loads(path, args.layers, args.repeat, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
