"""Conversation templates by name: how a conversation becomes training text, ids and labels, and how a
prompt becomes the ids predict generates from. The one place templates are recognised.

- ``vicuna`` (the default, ``DEFAULT_TEMPLATE``): MindFormers' ``llama_preprocess.py`` for Llama 2
  *and* Llama 3 (``research/llama3/``): Vicuna v1.1 text, split on ``</s>``, each round closed by the
  tokenizer's eos, instruction parts masked (``mftune.data.labelling``). With Llama 3's tokenizer the
  rounds end in ``<|end_of_text|>`` and the text ``</s>`` never reaches the tokenizer.
- ``llama3``: Llama 3 Instruct's header format (``mftune.data.llama3_labelling``); Llama3Tokenizer only.
- ``llama2`` (Llama 2 chat: ``<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>``),
  ``chatml`` (``<|im_start|>{role}\n{content}<|im_end|>\n``) and ``hf`` (the tokenizer's own Jinja
  ``chat_template``, from its directory): Jinja chat templates rendered with transformers' semantics
  (``mftune.data.conversation.render_chat``), tokenized as one text (the ids of transformers'
  ``apply_chat_template(messages, tokenize=True)``), trained on the assistant spans only
  (``labelling.tokenize_chat_batch``). Records may hold system messages (``{"from": "system"}`` or
  ``{"messages": [{"role": "system", ...}]}``). They need a tokenizer that reports token offsets:
  ``LlamaTokenizerFast`` (tokenizer.json), or ``Llama3Tokenizer`` for ``hf``.

A new fixed-text template is one entry in ``TEMPLATES`` (or, as Jinja, in ``CHAT_TEMPLATES``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jinja2

from mftune.data import labelling, llama3_labelling
from mftune.data.conversation import (CHATML_CHAT_TEMPLATE, LLAMA2_CHAT_TEMPLATE, LLAMA3_ROLES, assistant_spans,
                                      compile_chat_template, llama3_prompt, record_messages, render_chat, vicuna_prompt)
from mftune.data.records import conversation_prompt, conversation_turns
from mftune.data.tiktoken_tokenizer import EOT
from mftune.data.tokenizer_kinds import Tokenizer, chat_template_of
from mftune.errors import DataError, RecordError

DEFAULT_TEMPLATE = "vicuna"  # MindFormers' data tools, for Llama 2 and Llama 3 alike
RAW = "raw"  # predict only: each prompt as given, no template


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation template. ``render``: validated turns ``[(0 user | 1 assistant, text), ...]`` -> the
    sample's text; ``tokenize_batch``: the ``datasets.map`` function turning those texts into
    ``input_ids``/``labels``; ``prompt_ids``: one user message -> the ids to generate the answer from;
    ``stop_tokens``: special tokens that end an answer besides the model's eos; ``render_record``:
    a raw record and its index -> the sample's text (default: ``render`` of its turns)."""

    name: str
    render: Callable[[list[tuple[int, str]]], str] | None
    tokenize_batch: Callable[..., dict]
    prompt_ids: Callable[[Tokenizer, str], list[int]]
    tokenizer_types: tuple[str, ...]  # the tokenizer kinds it works with
    stop_tokens: tuple[str, ...] = ()
    render_record: Callable[[Any, int], str] | None = None

    def sample_text(self, record: Any, index: int) -> str:
        """The text a record becomes in this template (RecordError for a malformed one)."""
        if self.render_record is not None:
            return self.render_record(record, index)
        return self.render(conversation_turns(record, index))


def _llama3_render(turns: list[tuple[int, str]]) -> str:
    return llama3_prompt([(LLAMA3_ROLES[role], text) for role, text in turns])


TEMPLATES: dict[str, Template] = {
    "vicuna": Template("vicuna", conversation_prompt, labelling.tokenize_batch,
                       lambda tok, text: tok.encode(vicuna_prompt(text), add_bos=True),
                       ("LlamaTokenizer", "Llama3Tokenizer", "LlamaTokenizerFast")),
    "llama3": Template("llama3", _llama3_render, llama3_labelling.tokenize_batch,
                       lambda tok, text: tok.encode(llama3_prompt([("user", text)], add_generation_prompt=True),
                                                    add_bos=False),
                       ("Llama3Tokenizer",), stop_tokens=(EOT,)),
}


# Jinja templates by name (None: the tokenizer's own chat_template) and the kinds that report token offsets
CHAT_TEMPLATES: dict[str, str | None] = {"llama2": LLAMA2_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE, "hf": None}
_CHAT_TOKENIZERS = {"llama2": ("LlamaTokenizerFast",), "chatml": ("LlamaTokenizerFast",),
                    "hf": ("LlamaTokenizerFast", "Llama3Tokenizer")}
TEMPLATE_NAMES = (*TEMPLATES, *CHAT_TEMPLATES)
# end-of-turn tokens a Jinja template may close answers with; those it names also end generation
_END_OF_TURN = ("<|im_end|>", EOT, "<|end|>", "<end_of_turn>")


def _render_chat_record(source: str, special: dict[str, str], record: Any, index: int) -> str:
    """A record as the JSON of its rendered text and assistant spans (``labelling.tokenize_chat_batch``)."""
    messages = record_messages(record, index)
    try:
        text, spans = assistant_spans(source, messages, special)
    except (jinja2.TemplateError, ValueError) as e:
        raise RecordError(index, "conversations", f"the chat template refuses it: {e}") from None
    if not spans:
        raise RecordError(index, "conversations", "the chat template renders no assistant answer")
    return json.dumps({"text": text, "spans": spans}, ensure_ascii=False)


def _chat_prompt_ids(source: str, special: dict[str, str], tokenizer: Tokenizer, text: str) -> list[int]:
    prompt = render_chat(source, [{"role": "user", "content": text}], special, add_generation_prompt=True)
    return tokenizer.encode_batch([prompt])[0]


def _chat_template(name: str, tokenizer: Tokenizer, key: str) -> Template:
    source = CHAT_TEMPLATES[name] or chat_template_of(tokenizer)
    if source is None:
        raise DataError(f"{key}={name!r} is invalid with {tokenizer.vocab_file}: its directory has no chat template "
                        "(chat_template in tokenizer_config.json, chat_template.jinja or chat_template.json). Name a "
                        "template (llama2, llama3, chatml, vicuna), or use the model's tokenizer directory.")
    special = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{key}={name!r}: the chat template of {tokenizer.vocab_file} is not valid Jinja ({e}).") from None
    return Template(name, None, labelling.tokenize_chat_batch, functools.partial(_chat_prompt_ids, source, special),
                    _CHAT_TOKENIZERS[name], stop_tokens=tuple(t for t in _END_OF_TURN if t in source),
                    render_record=functools.partial(_render_chat_record, source, special))


def tokenizer_kinds(name: str) -> tuple[str, ...]:
    """The tokenizer kinds (``processor.tokenizer.type``) the template called ``name`` works with."""
    return TEMPLATES[name].tokenizer_types if name in TEMPLATES else _CHAT_TOKENIZERS.get(name, ())


def get_template(name: str | None, tokenizer: Tokenizer, key: str = "template") -> Template:
    """The template called ``name`` (None: ``DEFAULT_TEMPLATE``), checked against ``tokenizer``'s kind;
    DataError names ``key``, the value and the fix."""
    name = DEFAULT_TEMPLATE if name is None else name
    if name == RAW:
        raise DataError(f"{key}={name!r} is invalid here: {RAW} (prompts as given) is for run_mode predict; training "
                        f"data needs a conversation template. Use one of {', '.join(TEMPLATE_NAMES)}.")
    if name not in TEMPLATE_NAMES:
        raise DataError(f"{key}={name!r} is invalid: the conversation templates are {', '.join(TEMPLATE_NAMES)}. "
                        f"Use one of them.")
    kinds = tokenizer_kinds(name)
    if tokenizer.type_name not in kinds:
        raise DataError(f"{key}={name!r} is invalid with {tokenizer.type_name} ({tokenizer.vocab_file}): it "
                        f"needs {' or '.join(kinds)}. Use {key} {DEFAULT_TEMPLATE}, or the tokenizer.json of the "
                        f"model's directory (or Llama 3's tokenizer.model for llama3).")
    if name in CHAT_TEMPLATES:
        return _chat_template(name, tokenizer, key)
    if tokenizer.bos_token_id is None:
        raise DataError(f"{key}={name!r} is invalid with {tokenizer.vocab_file}: the tokenizer has no bos token, "
                        "which this template starts with. Use chatml or hf.")
    return TEMPLATES[name]
