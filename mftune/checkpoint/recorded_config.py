"""The architecture a checkpoint records (an mftune header's ``model_config``, a Hugging Face directory's
config.json) against the run's ``model_config``: a key that disagrees is an error naming both values.

Only what changes the meaning of the weights is compared (sizes, head counts, RoPE base and extension,
norm epsilon, tied embeddings): a model loaded with the wrong RoPE base or scaling runs without a shape
error and gives quietly wrong results. dtypes, sequence length and decoding settings may differ.
"""
from __future__ import annotations

import math
from typing import Any

from mftune.checkpoint.formats import checkpoint_header, huggingface, recognise
from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig, model_args

# ModelArgs field -> the model_config key a user sets (ffn_hidden_size comes from intermediate_size or the rule)
COMPARED = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_layers",
            "num_heads": "num_heads", "n_kv_heads": "n_kv_heads", "ffn_hidden_size": "intermediate_size",
            "rms_norm_eps": "rms_norm_eps", "theta": "theta", "extend_method": "extend_method",
            "scaling_factor": "scaling_factor", "tie_word_embeddings": "tie_word_embeddings",
            "max_position_embedding": "max_position_embedding"}  # with DYNAMIC_NTK on both sides (else None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def mismatches(recorded: dict[str, Any], run: LlamaConfig) -> list[tuple[str, Any, Any]]:
    """``(model_config key, run's value, recorded value)`` for each architecture value that differs
    (nothing when the recorded config cannot be read as a LlamaConfig)."""
    known = {k: v for k, v in recorded.items() if k in LlamaConfig.field_names() and k != "pet_config"}
    try:
        theirs, ours = model_args(LlamaConfig(**known)), model_args(run)
    except (TypeError, ValueError):
        return []
    return [(key, getattr(ours, field), getattr(theirs, field)) for field, key in COMPARED.items()
            if not _same(getattr(ours, field), getattr(theirs, field))
            and not (field == "max_position_embedding" and None in (getattr(ours, field), getattr(theirs, field)))]


def check_recorded_architecture(path: str, run: LlamaConfig) -> None:
    """A CheckpointError listing every architecture key of ``run`` that disagrees with what the
    checkpoint at ``path`` records (nothing when it records no model_config)."""
    recorded = checkpoint_header(path).get("model_config")
    if not isinstance(recorded, dict):
        return
    source = "its config.json" if recognise(path) is huggingface else "its header"
    found = mismatches(recorded, run)
    if found:
        raise CheckpointError("\n  ".join(
            [f"load_checkpoint={path} records another architecture than model.model_config ({source}):"] +
            [f"model.model_config.{key}={ours!r} is invalid: the checkpoint has {key}={theirs!r}. Set {key}: "
             f"{theirs!r}." for key, ours, theirs in found]))

