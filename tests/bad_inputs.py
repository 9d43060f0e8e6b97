"""The bad-input catalogue's shared inputs and checks (tests/e2e/test_bad_inputs.py).

``build_shared(d)`` writes, once per module, good inputs that the cases then spoil in their own folders:
parity's tiny Llama2 (config, token dataset, base checkpoint), the sample sentencepiece tokenizer, raw alpaca
and conversation JSON, lora_checkpoint's base + LoRA training checkpoint, a Hugging Face directory and a
MindSpore .ckpt of the tiny model. ``snapshot`` / ``changes`` tell whether a command changed, removed or
added a file in a folder (names, sizes, mtimes, content hashes); ``run_case`` runs one command as a user does.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import yaml

import lora_checkpoint as lc
import parity as pp
import tiny_hf
from mftune.checkpoint.load import unique_state_dict
from mftune.checkpoint.mindspore.ckpt import write_ckpt_streaming
from mftune.data.records import convert_alpaca
from mftune.data.sample import load_sample_records, train_sample_tokenizer

ROOT = pp.ROOT
PY = sys.executable
HF_KEEP = ("seq_length", "compute_dtype", "param_init_type", "pet_config")


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(s, d)`` spoils inputs in the case folder ``d`` (``s``: the shared inputs) and returns
    the command; it must end with ``status``, print no traceback and say every one of ``words`` (format fields
    ``{d}`` and ``{s}``: the two folders). New files may appear only under ``new`` (paths relative to ``d``), and
    a file under ``moved`` may be renamed (e.g. ``metrics.jsonl`` to ``metrics.jsonl.1``) but its bytes must
    remain in the folder."""
    id: str
    build: Callable[[SimpleNamespace, str], list[str]]
    status: int
    words: tuple[str, ...]
    new: tuple[str, ...] = ("out",)
    marks: tuple = field(default=())
    moved: tuple[str, ...] = ()  # files there may move (an earlier run's outputs set aside) if their bytes stay


def build_shared(d: str) -> SimpleNamespace:
    """The good inputs every case starts from, in ``d``."""
    config = pp.make_workdir(d)  # parity.yaml, data/ (97-token records, vocab 1000), base.safetensors
    with open(config) as f:
        cfg = yaml.safe_load(f)
    tok = train_sample_tokenizer(os.path.join(d, "tok"), 1000)
    cfg["processor"]["tokenizer"]["vocab_file"] = tok
    cfg["use_parallel"] = False  # one process: the cases run without the launcher
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    records = load_sample_records()[:40]
    alpaca, conv = os.path.join(d, "alpaca.json"), os.path.join(d, "conv.json")
    with open(alpaca, "w") as f:
        json.dump(records, f)
    with open(conv, "w") as f:
        json.dump(convert_alpaca(records)[0], f)
    os.makedirs(os.path.join(d, "lora"))
    lora = lc.build(pathlib.Path(d, "lora"))
    hf_dir = os.path.join(d, "hf")
    hf = tiny_hf.hf_model(vocab_size=1000, max_position_embeddings=128)  # fits the token dataset
    hf.save_pretrained(hf_dir)
    hf_cfg = copy.deepcopy(cfg)  # the architecture comes from config.json
    hf_cfg["load_checkpoint"] = ""
    hf_cfg["model"]["model_config"] = {k: v for k, v in cfg["model"]["model_config"].items() if k in HF_KEEP}
    hf_config = os.path.join(d, "hf.yaml")
    with open(hf_config, "w") as f:
        yaml.safe_dump(hf_cfg, f, sort_keys=False)
    ckpt = os.path.join(d, "model.ckpt")
    state = unique_state_dict(tiny_hf.mftune_from_hf(hf))
    write_ckpt_streaming(ckpt, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], state.items())
    return SimpleNamespace(dir=d, config=config, cfg=cfg, data=os.path.join(d, "data"), base=os.path.join(d, "base.safetensors"),
                           tok=tok, alpaca=alpaca, conv=conv, lora=lora.lora_path, lora_base=lora.base_path,
                           hf=hf_dir, hf_config=hf_config, ckpt=ckpt)


def snapshot(folder: str) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns, sha256)}`` of everything under ``folder``."""
    out = {}
    for directory, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(directory, name), folder)] = ("dir", 0, 0, "")
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[os.path.relpath(path, folder)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def _under(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == a or path.startswith(a.rstrip("/") + os.sep) for a in folders)


def changes(before: dict, after: dict, new_allowed: tuple[str, ...] = (), moved: tuple[str, ...] = ()) -> list[str]:
    """What differs between two snapshots: files changed or removed (unless under ``moved`` with their bytes
    still somewhere in the folder), and new paths outside ``new_allowed``."""
    hashes = {v[3] for v in after.values() if v[0] == "file"}
    problems = []
    for p, old in before.items():
        if p in after and (old[0] == "dir" or old == after[p]):
            continue
        if _under(p, moved) and old[3] in hashes:
            continue
        problems.append(f"removed: {p}" if p not in after else f"changed: {p} {old} -> {after[p]}")
    problems += [f"new: {p}" for p in after if p not in before and not _under(p, new_allowed)]
    return problems


def run_case(argv: list[str], cwd: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``argv`` in ``cwd`` with the repository importable and MFTUNE_DEBUG off; (result, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "MFTUNE_DEBUG"}
    env.update({"PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    start = time.time()
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    return r, time.time() - start
