"""The weights a model of a given ``model_config`` has: what conversion and merging check against."""
from __future__ import annotations

from typing import Any

import torch

from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM


def expected_weights(mc: dict[str, Any], where: str) -> tuple[LlamaConfig, dict[str, tuple[int, ...]]]:
    """The model's weight names and shapes (tied lm_head left out), from a build on the meta device."""
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig.from_dict(mc))
    except ValueError as exc:
        raise CheckpointError(f"{where}: its model config is invalid for mftune: {exc}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return model.config, shapes


def check_weights(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected weight is ``found`` with its shape; otherwise one error listing every problem."""
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"{n} has shape {list(found[n])}, the config needs {list(s)}" for n, s in expected.items()
                 if n in found and found[n] != s]
    if problems:
        raise CheckpointError(f"{where} does not match its model config: {'; '.join(problems)}. Check that the "
                              f"weights and the config belong to the same model (and that no shard is missing).")
