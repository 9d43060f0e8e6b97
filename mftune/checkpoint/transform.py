"""Checkpoint transformation (MindFormers' ``auto_trans_ckpt`` and ``transform_checkpoint.py``).

A source checkpoint (anything ``formats.open_checkpoint`` reads: complete file, directory of complete
files, Hugging Face or PEFT directory, distributed ``rank_*/`` directory) is rewritten for a
destination layout described by strategy files (``ckpt_strategy_rank_{r}.json``, written by every
run into ``<output_dir>/strategy`` and by ``--only_save_strategy``) as
``<dst>/<name>/rank_{r}/<prefix><r>.safetensors``: rank r's block of every tensor, with a header
recording each block (the same per-rank format the trainer saves, so it loads in any layout) and a
``meta.json`` holding the file's size. Without a destination strategy the result is one complete
file, ``rank_0/<prefix>0.safetensors`` (distributed -> complete). A destination strategy may also be
a MindSpore one (``ckpt_strategy_rank_{r}.ckpt`` of a MindFormers run, ``mindspore.strategy``), and
``output_format="ckpt"`` writes MindSpore ``.ckpt`` rank files (``rank_{r}/<prefix><r>.ckpt``, each
rank's slices in MindFormers' names: what MindFormers loads without auto_trans_ckpt) or, without a
destination strategy, one complete ``.ckpt``; a distributed ``.ckpt`` output needs a MindSpore
strategy (MindSpore reads no other).

What goes where, for destination rank r:
- a model parameter and its optimizer moments (``adam_m.``/``adam_v.``): r's block of it;
- counters (``epoch_num``, ``global_step``, ...): whole, in every file;
- per-rank RNG states: dropped (they belong to the saving layout; resume reads them from the
  source files when the layout is unchanged);
- any other tensor (not a parameter of the destination model): whole, in rank 0's file only.

Invariants: each rank reads only the byte ranges of its blocks (lazy safetensors slices); peak
memory is about one block; the output header is written first and tensors stream after it; every
file is atomic; the source is never modified: a destination inside the source (or the reverse),
or one holding anything but an earlier transform's output, is refused. A worker writes
``transform_succeed_rank_{w}.txt`` (holding an id of the run) or ``transform_failed_rank_{w}.txt``
(holding the error) into ``<dst>/<name>/`` when it is done.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from mftune.checkpoint.entries import Entry
from mftune.checkpoint.formats import checkpoint_header, distributed, open_checkpoint, reads_strategy, recognise
from mftune.checkpoint.formats.distributed import distributed_entries, file_blocks, rank_files
from mftune.checkpoint.keys import PER_RANK_KEYS, SCALAR_KEYS, is_lora, moment_names, parameter_of
from mftune.pet.config import init_method, is_base_init
from mftune.checkpoint.mindspore.ckpt import is_ckpt, write_ckpt_streaming
from mftune.checkpoint.mindspore.names import to_mindformers
from mftune.checkpoint.mindspore.strategy import MindSporeStrategy
from mftune.checkpoint.safetensors_io import encode_metadata, safetensors_header, write_safetensors_streaming
from mftune.errors import CheckpointError
from mftune.fileio import atomic_open, check_free_space, inside, specs_bytes
from mftune.log import Progress, with_progress

logger = logging.getLogger("mftune")

STRATEGY_FILE = re.compile(r"ckpt_strategy_rank_(\d+)\.json$")
MARKER = re.compile(r"transform_(succeed|failed)_rank_(\d+)\.txt$")
DEFAULT_PREFIX = "checkpoint_"
OUTPUT_FORMATS = {"mftune": ".safetensors", "safetensors": ".safetensors", "ckpt": ".ckpt", "mindspore": ".ckpt"}


def checkpoint_name(src: str) -> str:
    """MindFormers' ``<ckpt_name>``: a file's name without its extension, a directory's base name."""
    base = os.path.basename(os.path.normpath(src))
    return os.path.splitext(base)[0] if os.path.isfile(src) and base.endswith((".safetensors", ".ckpt")) else base


def read_strategy(path: str, world_size: int | None = None) -> dict[int, dict]:
    """``{rank: strategy record}`` from one ``ckpt_strategy_rank_{r}.json`` or a directory of them.

    A directory must hold a file for every rank ``0 .. world_size - 1`` (``world_size``: the
    number the rank-0 file records unless given), all recording that world size; files of other
    ranks (an earlier run's) are not read."""
    if os.path.isfile(path):
        record = _read_json(path)
        return {int(record["rank"]): record}
    if not os.path.isdir(path):
        raise CheckpointError(f"strategy {path} does not exist. Give a ckpt_strategy_rank_*.json file or the "
                              f"strategy/ directory of a run (--only_save_strategy True writes one).")
    files = {int(m.group(1)): os.path.join(path, f) for f in os.listdir(path)
             if (m := STRATEGY_FILE.fullmatch(f))}
    if 0 not in files:
        raise CheckpointError(f"strategy directory {path} has no ckpt_strategy_rank_0.json. Give the "
                              f"strategy/ directory of a run (--only_save_strategy True writes one).")
    world = world_size or int(_read_json(files[0])["world_size"])
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise CheckpointError(f"strategy directory {path} lacks ckpt_strategy_rank_{missing[0]}.json of a "
                              f"{world}-rank layout. Copy every rank's strategy file (all nodes' output/strategy).")
    records = {r: _read_json(files[r]) for r in range(world)}
    wrong = [r for r, rec in records.items() if int(rec.get("world_size", -1)) != world]
    if wrong:
        raise CheckpointError(f"strategy directory {path} mixes layouts: ckpt_strategy_rank_{wrong[0]}.json "
                              f"records world_size {records[wrong[0]].get('world_size')}, expected {world}. "
                              f"Remove the files of the other run.")
    return records


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
        if not {"rank", "world_size", "tensors"} <= record.keys():
            raise ValueError("no rank, world_size or tensors key")
        for name, info in record["tensors"].items():
            if not {"global_shape", "block"} <= info.keys():
                raise ValueError(f"tensor {name} has no global_shape or block")
        return record
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not JSON objects
        raise CheckpointError(f"strategy file {path} cannot be read ({exc}). It must be a "
                              f"ckpt_strategy_rank_*.json written by mftune.") from None


def check_source_strategy(strategy_path: str, files: list[str]) -> None:
    """``src_strategy``: that it describes the rank files (the files' headers record their blocks
    too; a strategy of another layout is a mistake worth stopping for)."""
    records = read_strategy(strategy_path, len(files)) if os.path.isdir(strategy_path) else read_strategy(strategy_path)
    for rank, file in enumerate(files):
        if rank not in records:
            continue
        blocks = file_blocks(file)
        for name, info in records[rank]["tensors"].items():
            for key in (name, *moment_names(name)):
                held = [list(b) for b in blocks[key][1]] if key in blocks else None
                if held is not None and held != info["block"]:
                    raise CheckpointError(
                        f"src_strategy {strategy_path} does not describe checkpoint {file}: tensor "
                        f"{key} is block {held} in the file, {info['block']} in "
                        f"the strategy. Pass the strategy of the run that saved it, or none (mftune's rank "
                        f"files record their own layout).")


def destination_blocks(entries: dict[str, Entry], record: dict | None) -> dict[str, tuple[slice, ...] | None]:
    """Per source tensor, the block destination rank ``record['rank']`` gets (None: not written)."""
    rank = record["rank"] if record else 0
    params = record["tensors"] if record else {}
    out: dict[str, tuple[slice, ...] | None] = {}
    for name, entry in entries.items():
        full = tuple(slice(0, n) for n in entry.shape)
        param = parameter_of(name)
        if name in PER_RANK_KEYS:
            out[name] = None
        elif param in params:
            info = params[param]
            if list(entry.shape) != list(info["global_shape"]):
                raise CheckpointError(
                    f"tensor {name} has shape {list(entry.shape)} in {entry.origin} but "
                    f"{info['global_shape']} in the destination strategy (rank {rank}): the strategy "
                    f"belongs to another model_config.")
            out[name] = tuple(slice(lo, hi) for lo, hi in info["block"])
        else:  # counters in every file; a tensor the destination model lacks: once, in rank 0's
            out[name] = full if name in SCALAR_KEYS or rank == 0 else None
    return out


def transform(src: str, dst_dir: str, strategy: dict[int, dict] | MindSporeStrategy | None, ranks: Iterable[int], *,
              prefix: str = DEFAULT_PREFIX, files: list[str] | None = None, name: str | None = None,
              progress: Progress | None = None, src_strategy: str = "", output_format: str = "mftune") -> list[str]:
    """Write ``<dst_dir>/<name>/rank_{r}/<prefix><r>.safetensors`` (``output_format="ckpt"``: ``.ckpt``)
    for each destination rank in ``ranks`` (``strategy`` None: one complete file for rank 0).
    ``files``: the rank files of a distributed source to use (default: each rank folder's last
    complete file); ``src_strategy``: the strategy of a distributed MindSpore source. Returns the paths."""
    suffix = _suffix(output_format)
    name = name or checkpoint_name(src)
    out_root = os.path.join(dst_dir, name)
    refuse_overlap(src, out_root)
    entries = distributed_entries(src, files) if files else open_checkpoint(src, src_strategy)
    if isinstance(strategy, MindSporeStrategy):
        strategy = strategy.records({n: e.shape for n, e in entries.items()})
    elif strategy and suffix == ".ckpt":
        raise CheckpointError("a distributed .ckpt checkpoint is read by MindSpore through a MindSpore strategy: "
                              "pass the strategy/ folder of a MindFormers run (ckpt_strategy_rank_*.ckpt) as the "
                              "destination strategy, or none for one complete .ckpt.")
    header = checkpoint_header(files[0] if files else src)
    if suffix == ".ckpt":
        _refuse_unportable_lora(header.get("pet_config") or (header.get("model_config") or {}).get("pet_config")
                                or {}, entries, src)
    header["transformed_from"] = {"path": os.path.abspath(src), "name": name}
    written = []
    for rank in ranks:
        record = strategy[rank] if strategy else None
        mesh = (record or {}).get("mesh") or {}
        header["layout"] = {"world_size": record["world_size"] if record else 1,  # the destination's
                            "data_parallel": mesh.get("dp", 1), "model_parallel": mesh.get("tp", 1)}
        blocks = destination_blocks(entries, record)
        written.append(_write_rank(entries, blocks, os.path.join(out_root, f"rank_{rank}"),
                                   f"{prefix}{rank}{suffix}", rank, header, progress))
    return written


def _refuse_unportable_lora(pet_config: dict, entries: dict[str, Entry], src: str) -> None:
    """A .ckpt has no header to say how its LoRA tensors are meant, and MindFormers scales B A by alpha / r and
    knows no DoRA magnitude: rsLoRA or DoRA adapters written there would mean something else."""
    used = [k for k in ("use_rslora", "use_dora") if pet_config.get(k)]
    if is_base_init(init_method(pet_config.get("init_lora_weights", True))):
        used.append(f"init_lora_weights {pet_config['init_lora_weights']} (MindFormers would not subtract B0 A0)")
    if used and any(is_lora(n) for n in entries):
        plain = pet_config.get("lora_alpha", 16) * math.sqrt(pet_config.get("lora_rank", 8))
        fix = f" (as plain LoRA these adapters have lora_alpha={plain:g})" if used == ["use_rslora"] else ""
        raise CheckpointError(f"output_format=ckpt is invalid for {src}: its LoRA adapters use {' and '.join(used)}, "
                              f"which a MindSpore .ckpt cannot record (MindFormers scales LoRA by lora_alpha / "
                              f"lora_rank and has no DoRA){fix}. Merge them first (scripts/transform_ckpt_lora.py "
                              f"--output_format ckpt), or keep output_format mftune.")


def _suffix(output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise CheckpointError(f"output_format={output_format} is invalid: use mftune (.safetensors) or ckpt "
                              f"(MindSpore .ckpt).")
    return OUTPUT_FORMATS[output_format]


def _write_rank(entries: dict[str, Entry], blocks: dict, rank_dir: str, file_name: str, rank: int,
                header: dict, progress: Progress | None) -> str:
    start = time.time()
    names = [n for n, b in blocks.items() if b is not None]
    specs = [(n, entries[n].dtype, tuple(s.stop - s.start for s in blocks[n])) for n in names]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        items = with_progress(progress, names, len(names))
        for n in items:
            yield n, entries[n].read(blocks[n])

    path = os.path.join(rank_dir, file_name)
    os.makedirs(rank_dir, exist_ok=True)
    check_free_space(rank_dir, specs_bytes(specs), f"the transformed checkpoint of rank {rank} ({file_name})")
    if is_ckpt(path):  # MindFormers' names; no header, no meta.json (MindFormers reads its own there)
        size = write_ckpt_streaming(path, *to_mindformers(specs, stream()))
    else:
        shards = {n: {"global_shape": list(entries[n].shape), "block": [[s.start, s.stop] for s in blocks[n]]}
                  for n in names if tuple(s.stop - s.start for s in blocks[n]) != entries[n].shape}
        metadata = encode_metadata({**{k: v for k, v in header.items() if k != "shards"},
                                    **({"shards": {"rank": rank, "tensors": shards}} if shards else {})})
        size = write_safetensors_streaming(path, specs, stream(), metadata)
        with atomic_open(os.path.join(rank_dir, "meta.json")) as f:
            json.dump({"last_ckpt_file": file_name, "file_size": os.path.getsize(path)}, f)
    logger.info("Transformed rank %d: %s (%d tensors, %.2f GB) in %.1f s", rank, path, len(names),
                size / 1e9, time.time() - start)
    return path


def refuse_overlap(src: str, out_root: str) -> None:
    """The destination must neither be inside the source nor hold it: it is cleared before writing."""
    holds = inside(src, out_root)
    if holds or inside(out_root, src):
        raise CheckpointError(
            f"the transformed checkpoint would be written to {out_root}, which "
            f"{'holds' if holds else 'is inside'} the source {src}; the "
            f"source would be overwritten. Load it without auto_trans_ckpt (mftune reshards on load), or "
            f"write the transform elsewhere (another output_dir / --dst_checkpoint_dir).")


def worker_ranks(world_size: int, process_num: int) -> dict[int, list[int]]:
    """MindFormers' split: ``process_num`` workers (ranks 0, w, 2w, ... with w = world / process_num),
    each transforming the ``w`` destination ranks from its own on. ``process_num`` above the world
    size is clamped; one that does not divide it is an error."""
    if process_num > world_size:
        logger.warning("transform_process_num=%d > world size %d: using %d", process_num, world_size,
                       world_size)
        process_num = world_size
    if process_num < 1 or world_size % process_num:
        raise CheckpointError(f"transform_process_num={process_num} must divide the world size "
                              f"{world_size}. Use a divisor, e.g. 1 or {world_size}.")
    per = world_size // process_num
    return {w: list(range(w, w + per)) for w in range(0, world_size, per)}


def check_destination(out_root: str) -> None:
    """Refuse a destination folder that holds anything besides an earlier transform's output
    (rank folders of files whose header says ``transformed_from``, their meta.json, markers; .ckpt
    files, which have no header, next to the markers of a transform): it would be overwritten or removed."""
    if not os.path.isdir(out_root):
        return
    marked = any(MARKER.fullmatch(e) for e in os.listdir(out_root))
    for entry in sorted(os.listdir(out_root)):
        path = os.path.join(out_root, entry)
        if MARKER.fullmatch(entry):
            continue
        if entry.startswith("rank_") and os.path.isdir(path):
            foreign = [f for f in sorted(os.listdir(path)) if f != "meta.json" and ".tmp." not in f
                       and not _transformed(os.path.join(path, f), marked)]
            if not foreign:
                continue
            path = os.path.join(path, foreign[0])
        raise CheckpointError(
            f"{out_root} already holds {path}, which is not the output of a checkpoint transform; the "
            f"transform would overwrite or remove it. Move it away, or write the transform elsewhere "
            f"(another output_dir / --dst_checkpoint_dir).")


def _transformed(file: str, marked: bool) -> bool:
    if is_ckpt(file):
        return marked
    try:
        return "mftune_transformed_from" in safetensors_header(file)[2]
    except CheckpointError:
        return False


def clear_destination(out_root: str) -> None:
    """Remove an earlier transform of the same name (checked to be one)."""
    check_destination(out_root)
    if os.path.isdir(out_root):
        shutil.rmtree(out_root)
    os.makedirs(out_root, exist_ok=True)


def write_marker(out_root: str, worker: int, error: str | None, token: str = "") -> None:
    """``transform_succeed_rank_{worker}.txt`` (holding ``token``, which identifies the run) or
    ``transform_failed_rank_{worker}.txt`` (holding the error); the other one is removed."""
    kind, other = ("failed", "succeed") if error else ("succeed", "failed")
    stale = os.path.join(out_root, f"transform_{other}_rank_{worker}.txt")
    if os.path.exists(stale):
        os.remove(stale)
    with atomic_open(os.path.join(out_root, f"transform_{kind}_rank_{worker}.txt")) as f:
        f.write(error or f"transform succeed {token}\n")


def check_markers(out_root: str, workers: Iterable[int], token: str) -> None:
    """Every worker's success marker of this run (``token``) is visible here."""
    for worker in workers:
        marker = os.path.join(out_root, f"transform_succeed_rank_{worker}.txt")
        try:
            with open(marker) as f:
                seen = f.read().split()[-1:]
        except OSError:
            seen = []
        if seen != [token]:
            raise CheckpointError(
                f"{marker} of this run is not visible on this node after the transform: output_dir must "
                f"be a directory shared by all nodes for auto_trans_ckpt. Use a shared output_dir, or "
                f"transform offline with scripts/transform_checkpoint.py and give each node its rank_* "
                f"folders.")


def transformed_files(out_root: str, world_size: int, prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [os.path.join(out_root, f"rank_{r}", f"{prefix}{r}.safetensors") for r in range(world_size)]


def auto_transform(src: str, output_dir: str, *, rank: int, world_size: int, process_num: int = 1,
                   src_strategy: str = "", files: list[str] | None = None) -> tuple[str, list[str]]:
    """``--auto_trans_ckpt True``: ``src`` rewritten for this run's layout (its strategy files in
    ``<output_dir>/strategy``, written by every rank before this is called) as
    ``<output_dir>/transformed_checkpoint/<name>/``, by ``process_num`` worker ranks; every rank
    waits for all of them. Returns the folder and this run's rank files in it.

    Each phase ends with a collective that tells every rank whether any rank failed, so all
    stop together with the error (no rank is left waiting at a barrier)."""
    out_root = os.path.join(output_dir, "transformed_checkpoint", checkpoint_name(src))
    workers = worker_ranks(world_size, process_num)
    token = _run_token()
    error = None
    try:
        refuse_overlap(src, out_root)
        kind = recognise(src)
        if src_strategy and not reads_strategy(kind) and (kind is distributed or len(files or []) > 1):
            check_source_strategy(src_strategy, files or rank_files(src))
        elif src_strategy and not reads_strategy(kind):
            logger.warning("src_strategy_path_or_dir=%s ignored: %s is a complete checkpoint", src_strategy, src)
        if rank == 0:
            clear_destination(out_root)
    except (CheckpointError, OSError) as exc:
        error = str(exc)
    _agree(error, rank, world_size, "checking the transform's source and destination")
    if rank in workers:  # the collective above also ensured every strategy file is written
        try:
            strategy = read_strategy(os.path.join(output_dir, "strategy"), world_size) if world_size > 1 else None
            transform(src, os.path.dirname(out_root), strategy, workers[rank], files=files, src_strategy=src_strategy)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
            logger.exception("checkpoint transform failed")
            error = f"{type(exc).__name__}: {exc}"
        try:
            write_marker(out_root, rank, error, token)
        except OSError as exc:
            error = error or f"cannot write the transform marker in {out_root}: {exc}"
    _agree(error, rank, world_size, "the checkpoint transform")
    try:
        check_markers(out_root, workers, token)
    except CheckpointError as exc:
        error = str(exc)
    _agree(error, rank, world_size, "finding the transformed checkpoint")
    logger.info("auto_trans_ckpt: %s transformed to %s (%d rank files)", src, out_root, world_size)
    return out_root, transformed_files(out_root, world_size)


def _run_token() -> str:
    """A random id, the same on every rank (rank 0's)."""
    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _agree(error: str | None, rank: int, world_size: int, what: str) -> None:
    """A collective: every rank learns the lowest rank with an ``error``; all raise if there is one."""
    failed = rank if error else world_size
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([failed], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        failed = int(flag)
    if error:
        raise CheckpointError(error)
    if failed < world_size:
        raise CheckpointError(f"{what} failed on rank {failed} (its error is in its log, worker_{failed}.log); "
                              f"every rank stops.")
