"""Perplexity on ``eval_dataset`` (``--run_mode eval``, and ``do_eval`` during training).

Every record of the eval dataset is read exactly once, split over the data-parallel ranks in
micro-batches of ``batch_size`` records (a last, partial step is filled with repeated records whose
labels are all ignored, so every rank runs the same shapes and nothing is counted twice). The loss
is summed over every supervised next-token position (labels != ``ignore_token_id``; a dataset with
``input_ids`` only is scored on every target but ``pad_token_id``, as MindFormers' input mask) and
divided by their number once, over all ranks:
``loss = sum / tokens``, ``PPL = exp(loss)`` (MindFormers' PerplexityMetric, token-weighted).
As in MindFormers, the forward hides pad-token keys (``mask_pad_token``) but the score keeps a
position whose *input* is the pad id: its eval forward + PerplexityMetric mask targets only, unlike its
training loss (``score_batch``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

from mftune.data.loader import TrainData
from mftune.errors import DataError
from mftune.heartbeat import beat
from mftune.parallel.data_parallel import reshard
from mftune.parallel.layout import local
from mftune.parallel.mesh import ParallelContext

logger = logging.getLogger("mftune")


def eval_batches(data: TrainData, ignore_token_id: int,
                 pad_token_id: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches covering each record once (see the module docstring).
    A dataset without labels is scored on its input_ids except ``pad_token_id`` (MindFormers' input mask)."""
    mb, step, n = data.micro_batch_size, data.micro_batch_size * data.dp_size, data.num_records
    for start in range(0, n, step):
        positions = torch.arange(start + data.dp_rank * mb, start + (data.dp_rank + 1) * mb)
        batch = data.rows(positions % n)
        if not data.has_labels and pad_token_id is not None:
            batch["labels"][batch["labels"] == pad_token_id] = ignore_token_id
        batch["labels"][positions >= n] = ignore_token_id
        yield batch


def batch_loss(model, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, supervised tokens)`` of a loader batch; packed records pass their position ids
    (left on the CPU: the model reads where samples start without a device sync)."""
    positions = batch.get("position_ids")
    return model(batch["input_ids"].to(device), batch["labels"].to(device), reduction="sum",
                 positions=positions, packed=positions is not None)


def score_batch(model, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, scored tokens)`` of a loader batch as MindFormers' eval scores it: the logits of
    ``input_ids[:, :-1]`` (pad keys hidden, ``mask_pad_token``) against every ``labels[:, 1:]`` that is
    not ``ignore_token_id``, including targets whose input is the pad id, which the training loss drops
    (``LlamaForCausalLM.loss_targets``); measured against MindFormers 1.3.2, tests/e2e/test_mindformers_pad.py."""
    positions = batch.get("position_ids")
    logits = model(batch["input_ids"][:, :-1].to(device), packed=positions is not None,
                   positions=None if positions is None else positions[:, :-1])  # (bs, seqlen, vocab)
    targets = batch["labels"][:, 1:].to(device)  # (bs, seqlen)
    ignore = model.config.ignore_token_id
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore, reduction="sum")
    return loss_sum, (targets != ignore).sum()


@torch.no_grad()
def evaluate(model, data: TrainData, *, device: torch.device, dp_group=None, vocab_sharded: bool = False) -> dict:
    """``{"loss", "ppl", "tokens", "records"}`` of ``model`` on ``data`` (every rank gets the same)."""
    was_training = model.training
    model.eval()
    ignore = model.config.ignore_token_id
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, supervised tokens
    try:
        for batch in eval_batches(data, ignore, model.config.pad_token_id):
            beat("eval")  # the launcher's hang watchdog: each batch is progress
            with loss_parallel() if vocab_sharded else contextlib.nullcontext():
                loss_sum, tokens = score_batch(model, batch, device)
            total += torch.stack([local(loss_sum).double(), local(tokens).double()])
    finally:
        model.train(was_training)
        reshard(model)  # FSDP2: no backward follows, so free the gathered weights
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    loss_sum, tokens = float(total[0]), int(total[1])
    if tokens == 0:
        raise DataError(f"eval_dataset {data.dataset_dir} has no supervised tokens (every label is "
                         f"ignore_token_id={ignore}). Use a dataset with labels to score.")
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens,
            "records": data.num_records}


def run_evaluation(model, data: TrainData, ctx: ParallelContext, output_dir: str, step: int | None = None) -> dict:
    """``evaluate`` in ``ctx``'s layout, logged, and written by rank 0 to eval_results.json (run_mode
    eval) or appended to eval_metrics.jsonl (do_eval, with the global ``step``)."""
    result = evaluate(model, data, device=ctx.device, dp_group=ctx.dp_group, vocab_sharded=ctx.vocab_parallel)
    logger.info("Eval result%s: loss: %.6f, PPL: %.6f (%d tokens, %d records)",
                "" if step is None else f" at step {step}", result["loss"], result["ppl"], result["tokens"],
                result["records"])
    if ctx.is_main:
        if step is None:
            with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
                json.dump(result, f, indent=1)
        else:
            with open(os.path.join(output_dir, "eval_metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
    return result
