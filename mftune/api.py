"""The Python API over Hugging Face model directories: ``LlamaForCausalLM.from_pretrained(dir)``,
``load_tokenizer(dir)`` and ``apply_chat_template(tokenizer, messages)``, as ``from mftune import ...``.

``mftune.LlamaForCausalLM`` is the model of ``mftune.models.llama`` plus ``from_pretrained``: the model
file stays free of checkpoint code (the loading lives above it, in ``mftune.checkpoint``), and every
instance is a ``mftune.models.llama.LlamaForCausalLM`` (same parameters, same state_dict names).
``from_pretrained`` follows the rules of ``pretrained_model_dir`` (``mftune.checkpoint.pretrained``):
the architecture from config.json, keyword arguments as ``model_config`` keys checked against it, and the
weights streamed from the directory into a model built on the meta device (one tensor at a time).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.pretrained import directory_model_config, merge_model_config
from mftune.data.conversation import render_chat
from mftune.data.tokenizer_kinds import Tokenizer, build_tokenizer, chat_template_of
from mftune.models import llama
from mftune.models.config import LlamaConfig, to_dtype

__all__ = ["LlamaConfig", "LlamaForCausalLM", "apply_chat_template", "load_tokenizer"]

logger = logging.getLogger("mftune")


class LlamaForCausalLM(llama.LlamaForCausalLM):
    """``mftune.models.llama.LlamaForCausalLM`` (its docstring says what the model is), plus loading a
    Hugging Face directory with ``from_pretrained``."""

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, **model_config: Any) -> "LlamaForCausalLM":
        """The model of the Hugging Face directory ``path`` (config.json + safetensors or .bin), in eval mode.

        ``dtype``: the parameters' and the compute dtype (a torch dtype or its name); None: config.json's
        ``torch_dtype`` on a GPU (float16 as bfloat16 where the GPU has it), float32 on a CPU (logged).
        ``device``: where the weights go (default: the GPU when there is one). ``model_config``: further
        ``model.model_config`` keys (``seq_length``, decoding settings; ``pet_config`` is not one: apply PET
        with ``mftune.pet.get_pet_model``); an architecture key that disagrees with config.json is a
        ConfigError naming both values.
        """
        if "pet_config" in model_config:
            raise ValueError("from_pretrained(pet_config=...) is invalid: PET is applied to the loaded model with "
                             "mftune.pet.get_pet_model(model, pet_config).")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        given = dict(model_config)
        if dtype is not None:
            name = str(to_dtype(dtype)).removeprefix("torch.")
            given.update(compute_dtype=name, param_init_type=name)
        gpu = device.type == "cuda"
        merged = merge_model_config(given, directory_model_config(path, "path"), path, gpu=gpu,
                                    bf16=gpu and torch.cuda.is_bf16_supported())
        for note in merged.notes:
            logger.info("%s: %s", path, note)
        for warning in merged.warnings:
            logger.warning("%s: %s", path, warning)
        config = LlamaConfig.from_dict(merged.model_config)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.tie_weights()
        load_checkpoint(model, path)
        return model.eval()


def load_tokenizer(path: str, type_name: str | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (tokenizer.json, else tokenizer.model: SentencePiece or
    tiktoken, by content) or of one tokenizer file, with the directory's special tokens and chat template.
    ``type_name`` (``LlamaTokenizer``, ``Llama3Tokenizer``, ``LlamaTokenizerFast``) picks a kind's file."""
    return build_tokenizer(path, type_name)


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The ids of ``messages`` (``[{"role": ..., "content": ...}]``) in the tokenizer's own Jinja chat template:
    transformers' ``apply_chat_template(messages, tokenize=True, add_generation_prompt=...)``. ValueError
    when the tokenizer's directory has no chat template."""
    source = chat_template_of(tokenizer)
    if source is None:
        raise ValueError(f"{tokenizer.vocab_file}: its directory has no chat template (tokenizer_config.json's "
                         "chat_template, chat_template.jinja or chat_template.json).")
    text = render_chat(source, messages, dict(getattr(tokenizer, "special_tokens_map", None) or {}),
                       add_generation_prompt=add_generation_prompt)
    return tokenizer.encode_batch([text])[0]
