"""Every (data_parallel, model_parallel) layout against one process: per-step losses.

    python bench/parallel_parity.py [--workdir DIR] [--quick]

Builds a tiny Llama2 (8 heads, 8 kv heads, FFN 176, vocab 1000, seq 96: every size divisible by 8),
a random base checkpoint and a random token dataset, then runs run_finetune.py once in one process
and, through ``scripts/launcher.sh``, on 8 CPU ranks (gloo) for (8,1), (4,2), (2,4), (1,8), each
with everything off and with enable_parallel_optimizer + use_seq_parallel + vocab-parallel
embedding/lm_head (vocab_emb_dp False) + recompute + 2 gradient-accumulation steps (where the
batch allows) on, for LoRA (finetune) and full-parameter
(train) runs. The global batch (8 sequences) and the seed are the same everywhere, so the
metrics.jsonl losses and gradient norms must agree; the tolerance is ``RTOL``.

Prints one line per run: layout, options, max relative loss and global_norm differences, seconds.
The harness is tests/parity.py; tests/distributed/test_parallel.py runs a smaller subset.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from parity import (ALL_OFF, ALL_ON, GLOBAL_BATCH, LAYOUTS, RTOL, compare, losses, make_workdir,  # noqa: E402
                    run_layout, run_single)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="LoRA only, all options on")
    args = parser.parse_args()
    d = args.workdir or tempfile.mkdtemp(prefix="mftune-parity-")
    config = make_workdir(d)
    failed = 0
    for run_mode in ("finetune",) if args.quick else ("finetune", "train"):
        ref_out = os.path.join(d, f"{run_mode}-single")
        r = run_single(config, run_mode, ref_out)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return 1
        ref, ref_norm = losses(ref_out), losses(ref_out, "global_norm")
        print(f"{run_mode} one process: losses {['%.6f' % x for x in ref]}")
        for dp, mp in LAYOUTS:
            for name, options in (("all off", ALL_OFF), ("all on", ALL_ON)):
                if args.quick and name == "all off":
                    continue
                out = os.path.join(d, f"{run_mode}-{dp}x{mp}-{name.replace(' ', '_')}")
                start = time.time()
                grad_accum = 2 if options is ALL_ON and GLOBAL_BATCH // dp >= 2 else 1
                r = run_layout(config, run_mode, out, dp, mp, options, grad_accum=grad_accum)
                diff = compare(ref, losses(out)) if r.returncode == 0 else float("inf")
                norm_diff = compare(ref_norm, losses(out, "global_norm")) if r.returncode == 0 else float("inf")
                ok = max(diff, norm_diff) <= RTOL
                failed += not ok
                print(f"{run_mode:8s} dp={dp} mp={mp} {name:7s}: max rel diff loss {diff:.2e}, "
                      f"global_norm {norm_diff:.2e} {'ok' if ok else 'FAIL'} ({time.time() - start:.0f} s)")
                if r.returncode:
                    print(r.stdout[-3000:], r.stderr[-3000:])
    print(f"workdir: {d}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
