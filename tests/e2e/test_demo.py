"""The README's first command: the embedded demo runs end to end and the loss falls in both stages."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quarter_means(path):
    with open(path) as f:
        losses = [json.loads(line)["loss"] for line in f]
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def test_demo_runs_and_the_loss_falls(tmp_path):
    r = subprocess.run([sys.executable, "scripts/demo.py", "--output_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Demo finished" in r.stdout
    for stage in ("train", "finetune"):
        first, last = _quarter_means(tmp_path / stage / "metrics.jsonl")
        assert last < first, (stage, first, last)
        assert (tmp_path / stage / "log/rank_0/info.log").exists()
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "finetune/run_summary.json").read_text())
    assert os.path.exists(summary["checkpoint"])
