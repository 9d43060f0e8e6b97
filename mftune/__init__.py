"""mftune: MindFormers-style LoRA fine-tuning of Llama-family models on PyTorch."""
from __future__ import annotations

__all__ = ["LlamaConfig", "LlamaForCausalLM", "apply_chat_template", "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `python -m mftune.launch` (the launcher, which needs no torch) starts at once.
    if name in __all__:  # mftune.api: the config, the model with from_pretrained, the tokenizer functions
        from mftune import api
        return getattr(api, name)
    raise AttributeError(f"module 'mftune' has no attribute {name!r}")
