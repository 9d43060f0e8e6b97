"""Llama2 as a plain ``nn.Module`` with MindFormers parameter names.

No distributed code and no LoRA live here (see ``mftune.parallel`` and ``mftune.pet``).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a MindFormers dtype string ("bfloat16", "float16", "float32") to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(set(DTYPES))}") from None


@dataclass
class LlamaConfig:
    """``model.model_config`` of a MindFormers Llama YAML.

    Keys that only matter on Ascend or for later features are accepted so that
    ``LlamaConfig(**model_config)`` takes the YAML block as it is.
    """

    type: str = "LlamaConfig"  # YAML registry name; only LlamaConfig exists
    batch_size: int = 1  # predict batch size (training uses runner_config.batch_size)
    seq_length: int = 2048  # tokens the model sees per sample (records hold seq_length + 1)
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    max_position_embedding: int | None = None  # None = seq_length
    vocab_size: int = 32000
    multiple_of: int = 256  # Llama2 FFN size rounding
    ffn_dim_multiplier: float | None = None
    intermediate_size: int | None = None  # explicit FFN size; overrides the rule above
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0  # RoPE base
    scaling_factor: float = 1.0  # RoPE position interpolation factor (extend_method PI)
    extend_method: str = "None"  # None | PI | NTK
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100
    compute_dtype: str = "float16"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    initializer_range: float = 0.02  # std of the normal init of weights
    tie_word_embeddings: bool = False
    use_past: bool = False  # KV cache for predict
    use_flash_attention: bool = True  # SDPA picks the fused kernel; False forces the math path
    qkv_concat: bool = False  # accepted; mftune always keeps wq/wk/wv separate
    offset: int = 0  # pipeline layer offset (ignored without pipeline parallel)
    checkpoint_name_or_path: str = ""
    repetition_penalty: float = 1.0
    max_decode_length: int = 512
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = False
    block_size: int = 16  # paged attention (inference); accepted, unused
    num_blocks: int = 512  # paged attention (inference); accepted, unused
    is_dynamic: bool = False  # accepted, unused
    pet_config: dict[str, Any] | None = None  # PET settings, consumed by mftune.pet

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.max_position_embedding is None:
            self.max_position_embedding = self.seq_length

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a ``model_config`` mapping; an unknown key is a ValueError naming the closest key."""
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError("unknown model_config key(s): " + ", ".join(hints))
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Llama2's FFN size rule (Meta ``FeedForward``), unless ``intermediate_size`` is given."""
        if self.intermediate_size:
            return self.intermediate_size
        hidden = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
