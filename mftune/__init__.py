"""mftune: MindFormers-style LoRA fine-tuning of Llama2 on PyTorch."""
from mftune.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
__version__ = "0.1.0"
