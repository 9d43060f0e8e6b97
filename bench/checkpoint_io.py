"""Convert and reshard a Llama2-7B-shaped bf16 checkpoint (13.5 GB): time against `cp`, peak RSS per process.

    python bench/checkpoint_io.py --workdir /tmp/mftune-ckpt               # 7B: ~41 GB of disk at the peak
    python bench/checkpoint_io.py --workdir /tmp/mftune-ckpt --layers 2    # smoke (~1.5 GB)

Steps, each a separate process running the real tool (scripts/convert_weight.py,
scripts/transform_checkpoint.py), timed wall-clock including its fsyncs:
  cp          `cp` of the source file + `sync` of the copy: the reference time for moving the bytes;
              run first and again last (disk and page-cache state vary), the faster one is the reference
  to HF       convert_weight.py --reversed: mftune file -> Hugging Face directory (5 GB shards)
  from HF     convert_weight.py: that directory -> mftune file (compared bit for bit with the source)
  -> A        transform_checkpoint.py: complete -> layout A, the 7B YAML's (data_parallel 8,
              model_parallel 1, optimizer sharding = FSDP2: every tensor split over 8 ranks)
  A -> B      layout A -> layout B (data_parallel 2, model_parallel 4, FSDP2 over tensor parallel),
              transform_process_num 2: two processes (rank_id 0 and 4) at once
  B -> full   layout B -> one complete file (compared bit for bit with the source)
The strategy files of A and B come from the trainer itself: 8 torchrun ranks (gloo) run
`build_model` with only_save_strategy (model on the meta device; no weights, no dataset).
Peak RSS is each process's ru_maxrss (os.wait4; this driver imports no torch, so what a child
inherits at fork is ~20 MB), which counts the source pages mapped while a tensor is read. The page cache is not dropped between steps (no root needed); `cp` runs under the same
conditions, right after the source is written. Goals (issue 4): every step <= 2x the cp time, peak
RSS about one tensor (the largest: 0.26 GB) plus a fixed overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # load_memory (this bench's workers import it)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from parity import free_port  # noqa: E402  (standard library only)
GB = 1e9
LAYOUTS = {"A": (8, 1), "B": (2, 4)}


def timed(*commands: list[str]) -> tuple[float, list[int]]:
    """Run the commands at once; (wall seconds until all end, each one's peak RSS in bytes)."""
    logs = [tempfile.TemporaryFile() for _ in commands]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for c, log in zip(commands, logs)]
    peaks = []
    for p, log in zip(procs, logs):
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            log.seek(0)
            raise SystemExit(f"failed ({p.returncode}): {' '.join(p.args)}\n{log.read().decode()[-3000:]}")
        peaks.append(usage.ru_maxrss * 1024)
    return time.perf_counter() - start, peaks


def strategies(workdir: str, layers: int) -> None:
    """<workdir>/strategy_A/strategy, strategy_B/strategy written by 8 trainer ranks (meta model)."""
    for name, (dp, mp) in LAYOUTS.items():
        out = os.path.join(workdir, f"strategy_{name}")
        if os.path.isdir(os.path.join(out, "strategy")):
            continue
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "8",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), os.path.abspath(__file__),
               "--strategy-worker", out, "--dp", str(dp), "--mp", str(mp), "--layers", str(layers)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"strategy run failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")


def strategy_worker(out: str, dp: int, mp: int, layers: int) -> int:
    import logging

    from load_memory import CONFIG

    from mftune.config import load_config
    from mftune.models.config import LlamaConfig
    from mftune.parallel.mesh import init_distributed, shutdown
    from mftune.trainer.build import build_model

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(CONFIG, check_files=False, overrides={
        "use_parallel": True, "only_save_strategy": True, "output_dir": out,
        "parallel_config.data_parallel": dp, "parallel_config.model_parallel": mp,
        "model.model_config.param_init_type": "bfloat16", "model.model_config.num_layers": layers})
    ctx = init_distributed(cfg.parallel_config)
    try:
        build_model(cfg, LlamaConfig.from_dict(cfg.model.model_config), ctx)
    finally:
        shutdown()
    return 0


def same_tensors(a: str, b: str) -> int:
    """Every tensor of file ``a`` equals ``b``'s, bit for bit (in a child process, one tensor at a time)."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--compare", a, b], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{a} and {b} differ:\n{r.stderr[-2000:]}")
    return int(r.stdout)


def compare(a: str, b: str) -> int:
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        assert set(fa.keys()) == set(fb.keys()), (a, b)
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.int16), y.view(torch.int16)), k
        print(len(list(fa.keys())))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/mftune-ckpt")
    parser.add_argument("--layers", type=int, default=32, help="num_layers (default 32: Llama2-7B)")
    parser.add_argument("--keep", action="store_true", help="keep the intermediate outputs")
    parser.add_argument("--json", help="also write the figures as JSON")
    parser.add_argument("--strategy-worker", help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--dp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mp", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.strategy_worker:
        return strategy_worker(args.strategy_worker, args.dp, args.mp, args.layers)

    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    src = os.path.join(w, f"llama2_{args.layers}l_bf16.safetensors")
    py = [sys.executable]
    if not os.path.exists(src):
        r = subprocess.run(py + ["bench/load_memory.py", "--make-checkpoint", src, "--layers", str(args.layers)],
                           cwd=ROOT)
        if r.returncode:
            return r.returncode
    size = os.path.getsize(src)
    strategies(w, args.layers)
    rows = []

    def step(name: str, *commands: list[str]) -> None:
        seconds, peaks = timed(*commands)
        rows.append({"step": name, "seconds": seconds, "peak_rss": peaks})
        print(f"{name:10s} {seconds:7.1f} s   peak RSS {', '.join(f'{p / GB:.2f}' for p in peaks)} GB", flush=True)

    copy = os.path.join(w, "copy.safetensors")
    step("cp", ["bash", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"])
    os.remove(copy)
    hf, back = os.path.join(w, "hf"), os.path.join(w, "from_hf.safetensors")
    step("to HF", py + ["scripts/convert_weight.py", "--reversed", "--input_path", src, "--output_path", hf])
    step("from HF", py + ["scripts/convert_weight.py", "--input_path", hf, "--output_path", back])
    checked = same_tensors(src, back)
    if not args.keep:
        shutil.rmtree(hf)
        os.remove(back)
    tool = py + ["scripts/transform_checkpoint.py"]
    a_dir, b_dir, full_dir = (os.path.join(w, n) for n in ("A", "B", "full"))
    step("-> A", tool + ["--src_checkpoint", src, "--dst_checkpoint_dir", a_dir,
                         "--dst_strategy", os.path.join(w, "strategy_A", "strategy")])
    a_src = os.path.join(a_dir, os.path.basename(src).removesuffix(".safetensors"))
    b_args = tool + ["--src_checkpoint", a_src, "--dst_checkpoint_dir", b_dir, "--transform_process_num", "2",
                     "--dst_strategy", os.path.join(w, "strategy_B", "strategy")]
    step("A -> B", b_args + ["--rank_id", "0"], b_args + ["--rank_id", "4"])
    if not args.keep:
        shutil.rmtree(a_dir)
    b_src = os.path.join(b_dir, os.path.basename(a_src))
    step("B -> full", tool + ["--src_checkpoint", b_src, "--dst_checkpoint_dir", full_dir])
    final = os.path.join(full_dir, os.path.basename(b_src), "rank_0", "checkpoint_0.safetensors")
    checked2 = same_tensors(src, final)
    if not args.keep:
        shutil.rmtree(b_dir)
        shutil.rmtree(full_dir)
    step("cp again", ["bash", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"])
    os.remove(copy)

    cp_s = min(rows[0]["seconds"], rows[-1]["seconds"])  # the faster copy: the stricter reference
    print(f"\nsource {src}: {size / GB:.2f} GB; {checked} tensors equal after HF round trip, {checked2} after "
          f"complete -> A -> B -> complete")
    print(f"{'step':10s} {'seconds':>8s} {'x cp':>6s} {'GB/s':>6s}  peak RSS per process (GB)")
    for row in rows:
        print(f"{row['step']:10s} {row['seconds']:8.1f} {row['seconds'] / cp_s:6.2f} {size / GB / row['seconds']:6.2f}"
              f"  {', '.join(f'{p / GB:.2f}' for p in row['peak_rss'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
