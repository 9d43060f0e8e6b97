"""CheckpointMonitor: MindFormers' checkpoint names, meta.json and retention (reference §8.2).

Files: ``<root>/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.safetensors`` with ``epoch``
the 1-based epoch and ``step`` the step within it (MindSpore's non-sink naming), and
``meta.json`` (``last_epoch``, ``last_step``, ``last_ckpt_file``) replaced atomically after the
file is complete. A training checkpoint holds the trainable parameters, their AdamW moments
(``adam_m.<name>``, ``adam_v.<name>``) and MindFormers' counters; frozen weights only with
``save_network_params`` (written to ``checkpoint_network/``).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import time

import torch
from torch import nn

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.keys import moment_names
from mftune.checkpoint.load import unique_state_dict
from mftune.errors import CheckpointError, TrainingError
from mftune.fileio import (
    atomic_open,
    disk_full,
    disk_full_reason,
    free_bytes,
    human_bytes,
    with_margin,
)
from mftune.parallel.gather import gather_ints, host_id
from mftune.parallel.layout import local, shard_layout, strategy

logger = logging.getLogger("mftune")
_MASK = 2**62 - 1  # st_dev and host ids as non-negative int64


class CheckpointMonitor:
    def __init__(self, root: str, prefix: str, *, rank: int = 0, keep_checkpoint_max: int = 5, save_network_params: bool = False,
                 save_trainable_params: bool = False):
        self.rank = rank
        self.root = root
        self.dir = os.path.join(root, "checkpoint", f"rank_{rank}")
        self.network_dir = os.path.join(root, "checkpoint_network", f"rank_{rank}")
        self.trainable_dir = os.path.join(root, "checkpoint_trainable", f"rank_{rank}")
        self.keep = keep_checkpoint_max
        self.save_network_params = save_network_params
        self.save_trainable_params = save_trainable_params
        os.makedirs(self.dir, exist_ok=True)
        self.prefix = self._free_prefix(f"{prefix}_rank_{rank}")
        self.written: list[str] = []
        self.last_step = 0
        self.best_eval: dict | None = None
        self.last_meta: dict | None = None

    def _free_prefix(self, prefix: str) -> str:
        """MindSpore's rule: if files with this prefix exist, use ``<prefix>_1``, ``_2``... so that
        an earlier run's checkpoints are never overwritten or pruned."""
        candidate, n = prefix, 0
        while glob.glob(os.path.join(glob.escape(self.dir), f"{glob.escape(candidate)}-*.safetensors")):
            n += 1
            candidate = f"{prefix}_{n}"
        if n:
            logger.info("Checkpoints with prefix %s exist in %s; this run uses prefix %s",
                        prefix, self.dir, candidate)
        return candidate

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
             step_in_epoch: int, global_step: int, loss_scale: float, global_batch_size: int,
             model_config: dict, extra_metadata: dict, loss_scale_good_steps: int = 0) -> str:
        """Write this rank's checkpoint of ``global_step`` (and the network / trainable-parameter files when
        asked), then meta.json, then prune. Every rank calls it at the same step: the free-space check
        before and the outcome after are agreed by all ranks, so that on any rank's failure every rank
        stops with a CheckpointError and meta.json and the earlier checkpoints stay as they were."""
        start = time.time()
        logger.info("......Saving ckpt......")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        counters = {"epoch_num": epoch, "step_num": step_in_epoch, "global_step": global_step,
                    "global_batch_size": global_batch_size,
                    "consumed_samples": global_step * global_batch_size,
                    "loss_scale_good_steps": loss_scale_good_steps}  # dynamic scale: steps since its last change
        tensors, sharded = self._training_tensors(trainable, optimizer, counters, loss_scale)
        metadata = {**extra_metadata, "shards": {"rank": self.rank, "tensors": sharded}} if sharded else extra_metadata
        name = f"{self.prefix}-{epoch}_{step_in_epoch}.safetensors"
        path = os.path.join(self.dir, name)
        files = [(path, tensors, metadata), *self._extra_files(model, trainable, extra_metadata, metadata)]
        need = sum(estimate_bytes(t, {"model_config": model_config, **m}) for _, t, m in files)
        self._check_space(need, global_step)
        self._write_files(files, model_config, need, global_step)
        self._write_meta(epoch, step_in_epoch, name)
        self.written.append(path)
        self._prune()
        self.last_step = global_step
        logger.info("global_batch_size: %d", global_batch_size)
        logger.info("epoch_num: %d", epoch)
        logger.info("step_num: %d", step_in_epoch)
        logger.info("global_step: %d", global_step)
        logger.info("Finish saving ckpt of epoch %d step %d using %.3f seconds (%s)",
                    epoch, step_in_epoch, time.time() - start, path)
        return path

    def _training_tensors(self, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                          counters: dict[str, int], loss_scale: float) -> tuple[dict[str, torch.Tensor], dict]:
        """(what a training checkpoint holds, the shard layout of its tensors that are only a part)."""
        # Each rank writes the block it holds (a DTensor's local shard; replicated tensors in full)
        # and, when some tensor is only a part, which part (global shape and index block).
        sharded = shard_layout(trainable)
        tensors: dict[str, torch.Tensor] = {n: local(p.detach()) for n, p in trainable.items()}
        state = optimizer.state
        for name, param in trainable.items():
            if param in state and "exp_avg" in state[param]:
                m, v = moment_names(name)
                tensors[m] = local(state[param]["exp_avg"]).float()
                tensors[v] = local(state[param]["exp_avg_sq"]).float()
                if name in sharded:
                    sharded[m] = sharded[v] = sharded[name]
        steps = [state[p]["step"] for p in trainable.values() if p in state and "step" in state[p]]
        counters = {**counters, "optimizer_step": int(steps[0]) if steps else 0}  # AdamW's (skipped steps excluded)
        tensors.update({k: torch.tensor(v, dtype=torch.int64) for k, v in counters.items()})
        tensors["loss_scale"] = torch.tensor(loss_scale, dtype=torch.float32)
        tensors["rng_state"] = torch.get_rng_state()  # this rank's: dropout continues exactly on resume
        if torch.cuda.is_available():
            tensors["cuda_rng_state"] = torch.cuda.get_rng_state()
        return tensors, sharded

    def _extra_files(self, model: nn.Module, trainable: dict[str, nn.Parameter], base_metadata: dict,
                     metadata: dict) -> list[tuple[str, dict[str, torch.Tensor], dict]]:
        """(path, tensors, header metadata) of the files ``save_network_params`` / ``save_trainable_params`` ask for."""
        files = []
        if self.save_network_params:
            net_sharded = shard_layout(model.state_dict())
            files.append((os.path.join(self.network_dir, f"{self.prefix}-network.safetensors"),
                          unique_state_dict(model),
                          {**base_metadata, "shards": {"rank": self.rank, "tensors": net_sharded}}
                          if net_sharded else base_metadata))
        if self.save_trainable_params:
            files.append((os.path.join(self.trainable_dir, f"{self.prefix}-trainable_params.safetensors"),
                          {n: local(p.detach()) for n, p in trainable.items()}, metadata))
        return files

    def _check_space(self, need: int, step: int) -> None:
        """CheckpointError on every rank, before anything is written, when some file system lacks the space its
        ranks' files of ``step`` need (``need`` bytes on this rank). Ranks on one machine writing to one file
        system are summed; ranks elsewhere on a shared file system cannot be told from the others, so each of
        them counts only itself plus the margin (``fileio.with_margin``)."""
        os.makedirs(self.dir, exist_ok=True)  # (removed since the run started: the save recreates it anyway)
        rows = gather_ints([need, free_bytes(self.dir), os.stat(self.dir).st_dev & _MASK, host_id()])
        groups: dict[tuple[int, int], list[int]] = {}
        for rank, (_, _, device, host) in enumerate(rows):
            groups.setdefault((device, host), []).append(rank)
        short = [(ranks, with_margin(sum(rows[r][0] for r in ranks)), min(rows[r][1] for r in ranks))
                 for ranks in groups.values()]
        short = [s for s in short if s[1] > s[2]]
        if not short:
            return
        ranks, total, free = next((s for s in short if self.rank in s[0]), short[0])
        mine = self.rank in ranks
        sharing = f" (the files of ranks {', '.join(map(str, ranks))})" if len(ranks) > 1 else ""
        raise CheckpointError(
            f"{'' if mine else f'rank {ranks[0]}: '}not enough disk space to save step {step} to "
            f"{self.dir if mine else self._rank_dir(ranks[0])}{sharing}: needs ~{human_bytes(total)}, "
            f"{human_bytes(free)} free. Free space or set keep_checkpoint_max lower; {self._previous()}.")

    def _write_files(self, files: list[tuple[str, dict, dict]], model_config: dict, need: int, step: int) -> None:
        """Write ``files``; then every rank learns whether every rank succeeded. On a failure anywhere, this
        rank removes what it wrote of ``step`` (meta.json still names the previous checkpoint) and raises."""
        written: list[str] = []
        failure: Exception | None = None
        try:
            for path, tensors, metadata in files:
                save_complete(path, tensors, model_config=model_config, extra_metadata=metadata)
                written.append(path)
        except Exception as exc:  # noqa: BLE001 -- every rank must hear of it before this one raises
            failure = exc
        codes = [row[0] for row in gather_ints([0 if failure is None else 1 if disk_full(failure) else 2])]
        if not any(codes):
            return
        for path in written:  # not a checkpoint without the other ranks' files
            os.remove(path)
        keep = f"Free space or set keep_checkpoint_max lower; {self._previous()}."
        if failure is not None and not disk_full(failure):
            raise failure
        if failure is not None:
            raise CheckpointError(
                f"not enough disk space to save step {step}: writing {files[len(written)][0]} failed "
                f"({disk_full_reason(failure)}); {human_bytes(free_bytes(self.dir))} free in {self.dir}, "
                f"this rank's files of the step take ~{human_bytes(need)}. The partial file was removed. {keep}"
            ) from None
        rank = next(r for r, c in enumerate(codes) if c)
        if codes[rank] == 1:
            raise CheckpointError(f"rank {rank} ran out of disk space saving step {step} to {self._rank_dir(rank)} "
                                  f"(its log names the file); this rank's files of step {step} were removed. {keep}")
        raise TrainingError(f"rank {rank} failed to save step {step} (its log has the error); this rank's files of "
                            f"step {step} were removed and it stops too; {self._previous()}.")

    def _rank_dir(self, rank: int) -> str:
        return os.path.join(os.path.dirname(self.dir), f"rank_{rank}")

    def _previous(self) -> str:
        """Which checkpoint of this rank is left as it was (for the messages of a failed save)."""
        if self.written:
            return f"the previous checkpoint {self.written[-1]} is intact"
        try:
            with open(os.path.join(self.dir, "meta.json")) as f:
                return f"the previous checkpoint {os.path.join(self.dir, json.load(f)['last_ckpt_file'])} is intact"
        except (OSError, ValueError, KeyError, TypeError):
            return f"no checkpoint was saved in {self.dir} before"

    def _write_meta(self, epoch: int, step: int, name: str) -> None:
        """meta.json, written last and atomically: the completion mark of ``name``, with its size
        so that a truncated or replaced file is detected when it is read."""
        self.last_meta = {"last_epoch": epoch, "last_step": step, "last_ckpt_file": name,
                          "file_size": os.path.getsize(os.path.join(self.dir, name))}
        self._dump_meta()

    def _dump_meta(self) -> None:
        with atomic_open(os.path.join(self.dir, "meta.json")) as f:
            json.dump({**self.last_meta, **({"best_eval": self.best_eval} if self.best_eval else {})}, f)

    def note_eval(self, step: int, result: dict) -> None:
        """Record an evaluation (do_eval); the lowest loss so far is meta.json's ``best_eval``
        (``step``, ``loss``, ``ppl``), rewritten now if this run has saved a checkpoint."""
        if not math.isfinite(result["loss"]):
            return
        if self.best_eval is None or result["loss"] < self.best_eval["loss"]:
            self.best_eval = {"step": step, "loss": result["loss"], "ppl": result["ppl"]}
            if self.last_meta:
                self._dump_meta()

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoint_max`` files written by this run."""
        while len(self.written) > self.keep:
            old = self.written.pop(0)
            if os.path.exists(old):
                os.remove(old)
                logger.info("Removed old checkpoint %s (keep_checkpoint_max=%d)", old, self.keep)


def save_strategy(strategy_dir: str, model: nn.Module, ctx, **settings) -> str:
    """``<strategy_dir>/ckpt_strategy_rank_{r}.json`` (MindFormers' name, JSON here): the mesh, the
    parallel ``settings`` and, for every parameter (frozen ones too, which LoRA resharding needs),
    its global shape, dtype, the block this rank holds and its placements. Written atomically."""
    path = os.path.join(strategy_dir, f"ckpt_strategy_rank_{ctx.rank}.json")
    record = {"rank": ctx.rank, "world_size": ctx.world_size, "mesh": {"dp": ctx.dp_size, "tp": ctx.tp_size},
              **settings, "tensors": strategy(dict(model.named_parameters()))}
    with atomic_open(path) as f:
        json.dump(record, f, indent=1)
    return path



def estimate_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> int:
    """The size of the safetensors file ``save_complete`` writes for ``tensors`` with header ``metadata``, from
    above: the tensors' bytes, per tensor its header entry (name, dtype, shape, offsets) and its checksums (16
    hex digits per MiB, named), and the metadata as JSON twice over (it is stored as escaped JSON strings)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    entries = sum(2 * len(name) + 160 + 24 * t.dim() + 20 * math.ceil(t.numel() * t.element_size() / 2**20)
                  for name, t in tensors.items())
    return data + entries + 2 * len(json.dumps(metadata, default=str)) + 1024
