from mftune.models.attention import KVCache
from mftune.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM"]
