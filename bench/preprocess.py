"""Preprocessing speed: scripts/llama_preprocess.py's tokens/s against bare sentencepiece.

    python bench/preprocess.py [--records 52000] [--seq_length 2048] [--num_proc 1 4 16]

Writes `--records` alpaca-format records (the bundled sample's generator, so the Vicuna-templated
texts look like the demo's), converts them with alpaca_converter's code, trains the demo
sentencepiece tokenizer, then times (wall clock, including reading JSON, templating, labelling and
writing Arrow):
  - the peer: `SentencePieceProcessor.encode(texts)` of every templated conversation in one call,
    one process (the cost of tokenization alone, no labels, nothing written);
  - `--dataset_type qa` with each `--num_proc`, unpacked and `--packing`;
  - `--dataset_type wiki` on the same texts (paragraphs) with each `--num_proc`.
The tokens/s figures are the ones the script prints in its summary (non-pad tokens written).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mftune.data.preprocess import write_json_atomic
from mftune.data.records import conversation_prompt, conversation_turns, convert_alpaca
from mftune.data.sample import generate_records, train_sample_tokenizer  # noqa: E402
from mftune.data.tokenizer import LlamaTokenizer  # noqa: E402


def script(*args: str) -> tuple[float, str]:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "llama_preprocess.py"), *args],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return time.perf_counter() - start, r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=52000)
    p.add_argument("--seq_length", type=int, default=2048)
    p.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        records = generate_records(args.records, seed=7)
        conv = os.path.join(d, "conv.json")
        conversations = convert_alpaca(records)[0]
        write_json_atomic(conversations, conv)
        tok_path = train_sample_tokenizer(os.path.join(d, "tok"))
        texts = [conversation_prompt(conversation_turns(c, i)) for i, c in enumerate(conversations)]
        with open(os.path.join(d, "wiki.txt"), "w") as f:
            f.write("\n\n".join(t.replace("\n\n", "\n") for t in texts))

        sp = LlamaTokenizer(tok_path).sp
        start = time.perf_counter()
        n = sum(len(ids) for ids in sp.encode(texts))
        peer = n / (time.perf_counter() - start)
        print(f"{args.records} conversations, {os.cpu_count()} CPUs; sentencepiece encode (peer): {peer:,.0f} tokens/s")
        runs = [("qa", []), ("qa --packing", ["--packing"]), ("wiki", [])]
        for name, extra in runs:
            kind = name.split()[0]
            src = conv if kind == "qa" else os.path.join(d, "wiki.txt")
            for num_proc in args.num_proc:
                out = os.path.join(d, f"out-{kind}-{len(extra)}-{num_proc}")
                wall, stdout = script("--dataset_type", kind, "--input_glob", src, "--model_file", tok_path,
                                      "--seq_length", str(args.seq_length), "--output_file", out,
                                      "--num_proc", str(num_proc), *extra)
                tps = float(re.search(r"([\d,]+) tokens/s", stdout).group(1).replace(",", ""))
                print(f"{name:14s} num_proc {num_proc:2d}: {tps:12,.0f} tokens/s ({tps / peer:.2f}x peer); "
                      f"whole command {wall:.1f} s")


if __name__ == "__main__":
    main()
