"""kill -9 trials (issue 14): a tiny LoRA run killed with SIGKILL at random moments, then resumed.

    python bench/kill_trials.py [--trials 20] [--seed 0] [--workdir DIR] [--keep]

The run: parity's tiny Llama2 (tests/parity.py), one process, 24 steps, a checkpoint every 3 steps,
keep_checkpoint_max 2 (pruning happens), LoRA dropout 0.05 (the RNG state must be restored too). First the
uninterrupted run (the reference), then per trial the same run killed at a random moment, drawn so that a good
share of kills land inside saves:
  - step:  SIGKILL when a random step (1-23) is logged in metrics.jsonl plus a random fraction of the time that
    step took (so the moment does not depend on the machine's load); kills before the first save (step 3)
    start the run again;
  - file:  SIGKILL when the temporary file of the checkpoint saved at a random step appears (the watcher polls
    the folder every 0.3 ms), at once or 0-2 ms later: inside the tensor write, the rename, meta.json or the
    pruning;
  - meta:  SIGKILL when that save's temporary meta.json appears (the file is complete, its mark is not).
Then the same command with ``--load_checkpoint <output_dir>/checkpoint --resume_training True`` in the same
output_dir, as a user reruns it (a run killed before its first save is started again; one that saved its end
is not rerun). Checked per trial (tests/kill_runs.py):
  - lost: the checkpoint meta.json names after the kill exists and is intact (size as recorded, header,
    every tensor read back with its checksums);
  - leftover: no mftune temporary file (``*.tmp.<pid>``, ``.<name>.tmp-*``) is left after the rerun started;
  - every step's loss after the resume point and every tensor of the final checkpoint (adapters, AdamW moments,
    counters, RNG state) equal the reference's, bit for bit.
Prints one row per trial and a summary; exit status 1 if a trial failed. Heavy: ~10 s per trial on 2 idle
cores. tests/e2e/test_kill_during_save.py runs two fixed moments (inside a save) of the same machinery.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import kill_runs as kr  # noqa: E402


def draw(rng: random.Random, i: int) -> kr.Kill:
    """Trial ``i``'s moment: 40 % any step, 40 % checkpoint file, 20 % meta.json (in a fixed rotation, drawn
    values)."""
    kind = ("step", "file", "meta", "file", "step")[i % 5]
    saves = list(range(kr.SAVE_EVERY, kr.STEPS + 1, kr.SAVE_EVERY))
    if kind == "step":
        return kr.Kill("step", rng.randint(1, kr.STEPS - 1), round(rng.uniform(0.0, 1.0), 2))
    extra = round(rng.choice([0.0, rng.uniform(0.0, 0.002)]), 4) if kind == "file" else 0.0
    return kr.Kill(kind, rng.choice(saves), extra)


def row(i: int, t: kr.Trial) -> str:
    resumed = {None: "- (ended)", 0: "0 (restart)"}.get(t.resumed_from, str(t.resumed_from))
    left = ", ".join(os.path.basename(p) for p in t.left) or "-"
    same = "n/a" if not t.compared_steps else ("yes" if not t.loss_diff else f"NO {t.loss_diff[:3]}")
    weights = "yes" if not t.tensor_diff else f"NO {t.tensor_diff[:2]}"
    result = "PASS" if t.ok else "FAIL" + (" (lost)" if t.lost else "") + (" (leftover)" if t.leftover else "")
    return (f"{i:>3} {str(t.kill):<26} {t.delay:>6.2f} {t.where:<36} {left[:48]:<48} {resumed:>11} "
            f"{len(t.leftover):>8} {t.compared_steps:>5} {same:<5} {weights:<5} {result}")


HEADER = (f"{'#':>3} {'kill moment':<26} {'at s':>6} {'killed while':<36} {'temporary files the kill left':<48} "
          f"{'resumed at':>11} {'leftover':>8} {'steps':>5} {'loss':<5} {'final':<5} result")


def summary(trials: list[kr.Trial], seconds: float) -> str:
    in_save = [t for t in trials if t.where.startswith(("writing", "after a file"))]
    lines = [
        f"{len(trials)} trials in {seconds:.0f} s: {sum(t.ok for t in trials)} passed",
        f"  killed inside a save (a temporary file or an unmarked file left): {len(in_save)}",
        f"  checkpoints lost: {sum(bool(t.lost) for t in trials)}"
        + "".join(f"\n    {x}" for t in trials for x in t.lost),
        f"  trials with temporary files left after the next start: {sum(bool(t.leftover) for t in trials)}"
        + "".join(f"\n    {x}" for t in trials for x in t.leftover),
        f"  resumed runs not bit-identical: {sum(bool(t.loss_diff or t.tensor_diff) for t in trials)}",
        f"  reruns that failed: {sum(bool(t.status) for t in trials)}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the workdir (its runs' logs and checkpoints)")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="kill_trials-")
    os.makedirs(work, exist_ok=True)
    start = time.time()
    config = kr.setup(work)
    ref = kr.reference(config, os.path.join(work, "reference"))
    print(f"reference: {len(ref.losses)} steps in {ref.seconds:.1f} s ({ref.training_seconds:.2f} s from the first "
          f"logged step); final {os.path.basename(ref.final)}",
          flush=True)
    rng = random.Random(args.seed)
    trials = []
    print(HEADER, flush=True)
    for i in range(args.trials):
        t = kr.trial(config, os.path.join(work, f"trial_{i:02d}"), draw(rng, i), ref)
        trials.append(t)
        print(row(i, t), flush=True)
    print(summary(trials, time.time() - start))
    if args.keep or args.workdir:
        print(f"runs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
