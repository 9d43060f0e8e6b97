"""Conversation templates by name: how a conversation becomes training text, ids and labels, and how a
prompt becomes the ids predict generates from. The one place templates are recognised.

- ``vicuna`` (the default, ``DEFAULT_TEMPLATE``): MindFormers' ``llama_preprocess.py`` for Llama 2
  *and* Llama 3 (``research/llama3/``): Vicuna v1.1 text, split on ``</s>``, each round closed by the
  tokenizer's eos, instruction parts masked (``mftune.data.labelling``). With Llama 3's tokenizer the
  rounds end in ``<|end_of_text|>`` and the text ``</s>`` never reaches the tokenizer.
- ``llama3``: Llama 3 Instruct's header format (``mftune.data.llama3_labelling``); Llama3Tokenizer only.

A new template (ChatML, a tokenizer's Jinja template) is one module with a ``tokenize_batch`` plus one
entry in ``TEMPLATES``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mftune.data import labelling, llama3_labelling
from mftune.data.conversation import LLAMA3_ROLES, llama3_prompt, vicuna_prompt
from mftune.data.records import conversation_prompt
from mftune.data.tiktoken_tokenizer import EOT
from mftune.data.tokenizer_kinds import Tokenizer
from mftune.errors import DataError

DEFAULT_TEMPLATE = "vicuna"  # MindFormers' data tools, for Llama 2 and Llama 3 alike


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation template. ``render``: validated turns ``[(0 user | 1 assistant, text), ...]`` -> the
    sample's text; ``tokenize_batch``: the ``datasets.map`` function turning those texts into
    ``input_ids``/``labels``; ``prompt_ids``: one user message -> the ids to generate the answer from;
    ``stop_tokens``: special tokens that end an answer besides the model's eos."""

    name: str
    render: Callable[[list[tuple[int, str]]], str]
    tokenize_batch: Callable[..., dict]
    prompt_ids: Callable[[Tokenizer, str], list[int]]
    tokenizer_types: tuple[str, ...]  # the tokenizer kinds it works with
    stop_tokens: tuple[str, ...] = ()


def _llama3_render(turns: list[tuple[int, str]]) -> str:
    return llama3_prompt([(LLAMA3_ROLES[role], text) for role, text in turns])


TEMPLATES: dict[str, Template] = {
    "vicuna": Template("vicuna", conversation_prompt, labelling.tokenize_batch,
                       lambda tok, text: tok.encode(vicuna_prompt(text), add_bos=True),
                       ("LlamaTokenizer", "Llama3Tokenizer")),
    "llama3": Template("llama3", _llama3_render, llama3_labelling.tokenize_batch,
                       lambda tok, text: tok.encode(llama3_prompt([("user", text)], add_generation_prompt=True),
                                                    add_bos=False),
                       ("Llama3Tokenizer",), stop_tokens=(EOT,)),
}


def get_template(name: str | None, tokenizer: Tokenizer, key: str = "template") -> Template:
    """The template called ``name`` (None: ``DEFAULT_TEMPLATE``), checked against ``tokenizer``'s kind;
    DataError names ``key``, the value and the fix."""
    name = DEFAULT_TEMPLATE if name is None else name
    if name not in TEMPLATES:
        raise DataError(f"{key}={name!r} is invalid: the conversation templates are {', '.join(TEMPLATES)}. "
                        f"Use one of them.")
    template = TEMPLATES[name]
    if tokenizer.type_name not in template.tokenizer_types:
        raise DataError(f"{key}={name!r} is invalid with {tokenizer.type_name} ({tokenizer.vocab_file}): it "
                        f"needs {' or '.join(template.tokenizer_types)}. Use {key} {DEFAULT_TEMPLATE}, or Llama 3's "
                        f"tokenizer.model.")
    return template
