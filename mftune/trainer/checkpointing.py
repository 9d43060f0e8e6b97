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
from mftune.fileio import atomic_open
from mftune.parallel.layout import local, shard_layout, strategy

logger = logging.getLogger("mftune")


class CheckpointMonitor:
    def __init__(self, root: str, prefix: str, *, rank: int = 0, keep_checkpoint_max: int = 5, save_network_params: bool = False,
                 save_trainable_params: bool = False):
        self.rank = rank
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
        start = time.time()
        logger.info("......Saving ckpt......")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
        base_metadata = extra_metadata
        if sharded:
            extra_metadata = {**extra_metadata, "shards": {"rank": self.rank, "tensors": sharded}}
        counters = {"epoch_num": epoch, "step_num": step_in_epoch, "global_step": global_step,
                    "global_batch_size": global_batch_size,
                    "consumed_samples": global_step * global_batch_size,
                    "loss_scale_good_steps": loss_scale_good_steps}  # dynamic scale: steps since its last change
        steps = [state[p]["step"] for p in trainable.values() if p in state and "step" in state[p]]
        counters["optimizer_step"] = int(steps[0]) if steps else 0  # AdamW's count (skipped steps excluded)
        tensors.update({k: torch.tensor(v, dtype=torch.int64) for k, v in counters.items()})
        tensors["loss_scale"] = torch.tensor(loss_scale, dtype=torch.float32)
        tensors["rng_state"] = torch.get_rng_state()  # this rank's: dropout continues exactly on resume
        if torch.cuda.is_available():
            tensors["cuda_rng_state"] = torch.cuda.get_rng_state()
        name = f"{self.prefix}-{epoch}_{step_in_epoch}.safetensors"
        path = os.path.join(self.dir, name)
        save_complete(path, tensors, model_config=model_config, extra_metadata=extra_metadata)
        self._write_meta(epoch, step_in_epoch, name)
        self.written.append(path)
        self._prune()
        if self.save_network_params:
            net = os.path.join(self.network_dir, f"{self.prefix}-network.safetensors")
            net_sharded = shard_layout(model.state_dict())
            save_complete(net, unique_state_dict(model), model_config=model_config,
                          extra_metadata={**base_metadata, "shards": {"rank": self.rank, "tensors": net_sharded}}
                          if net_sharded else base_metadata)
        if self.save_trainable_params:
            tr = os.path.join(self.trainable_dir, f"{self.prefix}-trainable_params.safetensors")
            save_complete(tr, {n: local(p.detach()) for n, p in trainable.items()},
                          model_config=model_config, extra_metadata=extra_metadata)
        self.last_step = global_step
        logger.info("global_batch_size: %d", global_batch_size)
        logger.info("epoch_num: %d", epoch)
        logger.info("step_num: %d", step_in_epoch)
        logger.info("global_step: %d", global_step)
        logger.info("Finish saving ckpt of epoch %d step %d using %.3f seconds (%s)",
                    epoch, step_in_epoch, time.time() - start, path)
        return path

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

