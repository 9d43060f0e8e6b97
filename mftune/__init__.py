"""mftune: MindFormers-style LoRA fine-tuning of Llama2 on PyTorch."""
from __future__ import annotations

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `python -m mftune.launch` (the launcher, which needs no torch) starts at once.
    if name in __all__:
        from mftune.models import llama
        return getattr(llama, name)
    raise AttributeError(f"module 'mftune' has no attribute {name!r}")
