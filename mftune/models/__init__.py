from mftune.models.attention import KVCache
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM"]
