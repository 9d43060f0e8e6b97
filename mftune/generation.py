"""Batched text generation with a KV cache: the core of ``--run_mode predict`` (MindFormers ``model.generate``).

Semantics are transformers' ``generate`` for a decoder-only model, so that the same weights give the
same tokens (tested against it in tests/unit/test_generation.py):
- prompts are LEFT padded to one length; padding is masked out of attention and position ids count
  real tokens only (``cumsum(mask) - 1``), so a row's output does not depend on its batch mates;
- per step the last position's float32 logits go through, in transformers' order,
  repetition penalty (always), then, when sampling, temperature, top-k, top-p; greedy is the argmax
  of the penalised logits, sampling draws from their softmax with ``torch.multinomial``;
- the repetition penalty covers the row's prompt and generated tokens, never its padding
  (transformers >= 5 ``RepetitionPenaltyLogitsProcessor(prompt_ignore_length=...)`` does the same);
- a row stops after emitting an ``eos_token_id`` (which is kept in its output, as MindFormers and
  transformers keep it) or after its ``max_new_tokens`` budget.

MindFormers' ``max_decode_length`` is the total length, prompt included, checked per row
(``text_generator.py``: a row finishes when ``valid_length == max_length``); ``max_new_tokens_for``
turns it into the per-row budgets that ``generate`` takes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mftune.models.attention import KVCache
from mftune.models.config import LlamaConfig


def max_new_tokens_for(prompts: Sequence[Sequence[int]], max_decode_length: int) -> list[int]:
    """Per-row budgets ``max_decode_length - len(prompt)`` (MindFormers: total length incl. the prompt).

    A prompt that already fills ``max_decode_length`` is a ValueError naming the prompt and the key.
    """
    too_long = [i for i, p in enumerate(prompts) if len(p) >= max_decode_length]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"max_decode_length={max_decode_length} is invalid: prompt {i} has {len(prompts[i])} tokens "
            f"({len(too_long)} prompt(s) this long), leaving no room to generate (max_decode_length counts the "
            "prompt). Raise model.model_config.max_decode_length or shorten the prompts.")
    return [max_decode_length - len(p) for p in prompts]


def generation_errors(*, max_new_tokens: int | Sequence[int], num_prompts: int, do_sample: bool, top_k: int,
                      top_p: float, temperature: float, repetition_penalty: float) -> list[str]:
    """Every invalid generation setting, each ``"<key>=<value> is invalid: <why>. <fix>"`` (model_config keys)."""
    errors: list[str] = []
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not all(isinstance(b, int) and b >= 0 for b in budgets):
        errors.append(f"max_new_tokens={max_new_tokens!r} is invalid: budgets must be ints >= 0. "
                      "Use e.g. max_new_tokens=128, or max_new_tokens_for(prompts, max_decode_length).")
    elif not isinstance(max_new_tokens, int) and len(budgets) != num_prompts:
        errors.append(f"max_new_tokens={max_new_tokens!r} is invalid: {len(budgets)} budgets for {num_prompts} "
                      "prompts. Give one int, or one budget per prompt.")
    if not isinstance(do_sample, bool):
        errors.append(f"do_sample={do_sample!r} is invalid: must be True or False. Use do_sample: False for greedy.")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        errors.append(f"top_k={top_k!r} is invalid: must be an int >= 0 (0 = no top-k filter). Use e.g. top_k: 3.")
    if not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        errors.append(f"top_p={top_p!r} is invalid: must be in [0, 1] (1 = no top-p filter). Use e.g. top_p: 0.9.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        errors.append(f"temperature={temperature!r} is invalid: must be > 0. Use temperature: 1.0 (no change), "
                      "or do_sample: False for greedy decoding.")
    if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
        errors.append(f"repetition_penalty={repetition_penalty!r} is invalid: must be > 0 (1 = no penalty). "
                      "Use e.g. repetition_penalty: 1.0.")
    return errors


# ----------------------------------------------------------------------------------------------
# Logits processors: transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
# TopKLogitsWarper, TopPLogitsWarper (min_tokens_to_keep=1), on (bs, vocab) float scores.
# ----------------------------------------------------------------------------------------------

def apply_repetition_penalty(scores: Tensor, token_ids: Tensor, valid: Tensor, penalty: float) -> Tensor:
    """Scores of tokens occurring in ``token_ids`` (bs, seq) where ``valid``: negative ones times ``penalty``,
    others divided by it (CTRL's penalty). Each seen token is penalised once however often it occurs."""
    vocab = scores.shape[-1]
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, torch.where(valid, token_ids, vocab), True)  # column `vocab` absorbs the invalid slots
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def check_generation(**settings) -> None:
    """``generation_errors(**settings)`` as one ValueError listing them all (nothing when all are valid)."""
    errors = generation_errors(**settings)
    if errors:
        raise ValueError("invalid generation settings:\n  " + "\n  ".join(errors))


def apply_top_k(scores: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` highest scores (ties with the k-th included), -inf elsewhere."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]  # (bs, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: drop the least likely tokens whose cumulative probability is <= 1 - top_p;
    the most likely token always stays."""
    ascending, order = torch.sort(scores, descending=False)  # (bs, vocab)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def process_logits(scores: Tensor, token_ids: Tensor, valid: Tensor, *, do_sample: bool, top_k: int,
                   top_p: float, temperature: float, repetition_penalty: float) -> Tensor:
    """transformers' processor chain for one step; warpers only when sampling (as ``generate`` does)."""
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, token_ids, valid, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            scores = scores / temperature
        if top_k != 0:
            scores = apply_top_k(scores, top_k)
        if top_p < 1.0:
            scores = apply_top_p(scores, top_p)
    return scores


# ----------------------------------------------------------------------------------------------
# The decoding loop.
# ----------------------------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ids, valid)``, each (bs, max_len): prompts right-aligned after ``pad_token_id``; valid marks real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return ids.to(device), valid.to(device)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. MindFormers keeps them in ``model.model_config`` (``LlamaConfig``); they are
    read from there once (``from_model_config``) and used only here and by predict."""

    max_decode_length: int = 512  # prompt + generated tokens, per row
    do_sample: bool = False
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model_config(cls, mc: LlamaConfig) -> "GenerationConfig":
        return cls(mc.max_decode_length, mc.do_sample, mc.top_k, mc.top_p, mc.temperature, mc.repetition_penalty)

    def sampling(self) -> dict[str, Any]:
        """The keywords ``generate`` and ``process_logits`` take."""
        return {"do_sample": self.do_sample, "top_k": self.top_k, "top_p": self.top_p,
                "temperature": self.temperature, "repetition_penalty": self.repetition_penalty}


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             eos_token_id: int | Sequence[int] | None, pad_token_id: int, do_sample: bool = False, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Generate continuations of ``prompts`` (token ids) with ``model`` (an mftune ``LlamaForCausalLM``).

    Returns the generated ids only, one list per prompt, ending with the eos token when one was
    produced. ``max_new_tokens`` is one budget for every row or one per row (``max_new_tokens_for``
    maps MindFormers' ``max_decode_length``). ``do_sample=False`` is greedy and ignores
    ``top_k``/``top_p``/``temperature``; ``top_k=0`` and ``top_p=1`` disable those filters.
    ``generator`` (on the model's device) makes sampling reproducible; None draws from torch's global RNG.
    The model runs in eval mode (LoRA dropout off) and gets its previous mode back; LoRA layers work
    merged or unmerged. One ``KVCache`` of ``longest prompt + largest budget`` slots serves the batch.

    Parallel (a model split by ``mftune.parallel``, sequence parallel off): every rank calls this
    with the same prompts; vocabulary-sharded logits are gathered, and rank 0's tokens are
    broadcast each step, so every rank feeds the same tokens and stops at the same step.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts is invalid: give at least one prompt, each with at least one token "
                         "(e.g. the bos token).")
    settings = {"do_sample": do_sample, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                "repetition_penalty": repetition_penalty}
    check_generation(max_new_tokens=max_new_tokens, num_prompts=len(prompts), **settings)
    device = next(model.parameters()).device
    budget = torch.tensor([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
                          else list(max_new_tokens), device=device)  # (bs,)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)  # (n_eos,)
    rows = _Rows(prompts, int(budget.max()), pad_token_id, device)
    cache = KVCache(model.config.num_layers, rows.prompt_len + rows.steps)
    done = budget == 0  # (bs,)
    produced = torch.zeros_like(budget)  # tokens generated per row, eos included
    feed, positions, attention_mask = rows.ids, rows.positions, rows.valid
    was_training = model.training
    model.eval()
    try:
        for step in range(rows.steps):
            if bool(done.all()):
                break
            logits = model(feed, positions=positions, attention_mask=attention_mask, cache=cache, last_only=True)
            token = _choose(logits, rows, settings, generator)  # (bs,)
            alive = ~done
            token = torch.where(alive, token, pad_token_id)  # finished rows are fed padding, never read
            rows.append(step, token, alive)
            produced += alive.long()
            done = done | torch.isin(token, eos) | (produced >= budget)
            feed, positions = token[:, None], positions[:, -1:] + 1  # (bs, 1) each
            attention_mask = rows.slots[:, :rows.prompt_len + step + 1]
    finally:
        model.train(was_training)
    generated = rows.history[:, rows.prompt_len:].tolist()
    return [row[:n] for row, n in zip(generated, produced.tolist())]


class _Rows:
    """The token history of a batch being decoded: left-padded prompts then generated tokens."""

    def __init__(self, prompts: Sequence[Sequence[int]], steps: int, pad_token_id: int, device: torch.device):
        self.ids, self.valid = left_pad(prompts, pad_token_id, device)  # (bs, prompt_len) each
        bs, self.prompt_len = self.ids.shape
        self.steps = steps
        self.history = torch.cat([self.ids, self.ids.new_full((bs, steps), pad_token_id)], dim=1)  # (bs, len + steps)
        self.seen = torch.cat([self.valid, self.valid.new_zeros((bs, steps))], dim=1)  # the slots the penalty reads
        self.slots = torch.cat([self.valid, self.valid.new_ones((bs, steps))], dim=1)  # attention_mask grows into this
        self.positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)  # (bs, prompt_len); padding's never read

    def append(self, step: int, token: Tensor, alive: Tensor) -> None:
        self.history[:, self.prompt_len + step], self.seen[:, self.prompt_len + step] = token, alive


def _choose(logits: Tensor, rows: _Rows, settings: dict[str, Any], generator: torch.Generator | None) -> Tensor:
    """The next token of every row (bs,): penalised, warped, then argmax or a draw; on several ranks
    rank 0's choice (identical on every rank in exact arithmetic; made so in floating point)."""
    if isinstance(logits, DTensor):  # vocabulary-parallel lm_head
        logits = logits.full_tensor()
    scores = process_logits(logits[:, -1], rows.history, rows.seen, **settings)  # (bs, vocab)
    if settings["do_sample"]:
        token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    else:
        token = scores.argmax(dim=-1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(token, src=0)
    return token
