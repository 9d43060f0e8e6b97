"""Prompt templates of MindFormers' Llama data tools, and Llama 3's chat format.

- The Vicuna v1.1 conversation template (`mindformers/tools/dataset_preprocess/llama/conversation.py`,
  adapted from FastChat): `"{system} USER: {prompt} ASSISTANT: {answer}</s>"`, separator style
  ADD_COLON_TWO (sep " " after a user turn, sep2 "</s>" after an assistant turn). MindFormers'
  Llama 3 tools (`research/llama3/llama_preprocess.py` and `conversation.py`, v1.1.0 to v1.5.0) use
  this same template with the Llama 3 tokenizer.
- The Stanford-Alpaca prompt that `alpaca_converter.py` puts in the human turn.
- Llama 3 Instruct's chat format (Meta's; the chat template of its Hugging Face tokenizer_config.json):
  `<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`
  with the content stripped. No MindFormers tool writes it; mftune offers it as the `llama3` template.
- Jinja chat templates rendered with transformers' semantics (`render_chat`, `assistant_spans`): Llama 2
  chat's and ChatML's (the `llama2` and `chatml` templates, the texts of their Hugging Face tokenizers), or
  a tokenizer's own (`hf`).

The strings are byte-for-byte MindFormers' (and Meta's); tokenisation and the label mask depend on them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from datetime import datetime
from enum import Enum, auto

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mftune.data.tiktoken_tokenizer import BOS_TOKEN, END_HEADER, EOT, START_HEADER
from mftune.errors import RecordError


class SeparatorStyle(Enum):
    ADD_COLON_TWO = auto()  # the only style MindFormers' Llama tools use


@dataclasses.dataclass
class Conversation:
    """A conversation template plus its messages (FastChat's `Conversation`, trimmed)."""

    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    messages: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=list(self.messages))

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append((role, message))

    def get_prompt(self) -> str:
        """The prompt text. ADD_COLON_TWO: `system + sep`, then `role: msg` + sep / sep2 alternately;
        an empty last message leaves `role:` open for generation."""
        seps = [self.sep, self.sep2]
        ret = self.system + seps[0]
        for i, (role, message) in enumerate(self.messages):
            ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        return ret


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

conv_vicuna_v1_1 = Conversation(
    system=VICUNA_SYSTEM,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.ADD_COLON_TWO,
    sep=" ",
    sep2="</s>",
)


def get_default_conv_template(model_name: str = "vicuna") -> Conversation:
    """MindFormers' lookup: names containing "vicuna" (llama_preprocess asks for "vicuna") -> v1.1.
    The template is returned as a fresh copy; mutate freely."""
    name = model_name.lower()
    if "vicuna" in name or "output" in name:
        return conv_vicuna_v1_1.copy()
    raise ValueError(f"conversation template {model_name!r} is not available; mftune ships 'vicuna' (v1.1).")


# Stanford Alpaca's prompts, as in MindFormers' alpaca_converter.py.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (alpaca's field name)
    """The human turn alpaca_converter builds: the with-input prompt when `input` is non-empty."""
    if input != "":
        return PROMPT_DICT["prompt_input"].format(instruction=instruction, input=input)
    return PROMPT_DICT["prompt_no_input"].format(instruction=instruction)


def vicuna_prompt(user: str, assistant: str | None = None) -> str:
    """One-round Vicuna v1.1 text; `assistant=None` ends with "ASSISTANT:" (the predict prompt)."""
    conv = get_default_conv_template("vicuna")
    conv.append_message(conv.roles[0], user)
    conv.append_message(conv.roles[1], assistant)
    return conv.get_prompt()


LLAMA3_ROLES = ("user", "assistant")  # a conversation's turn index 0 / 1 (human / gpt)


def llama3_header(role: str) -> str:
    """The header that opens a Llama 3 message: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n``."""
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def llama3_prompt(messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """Llama 3's chat text of ``(role, content)`` messages (roles system / user / assistant), as Meta's chat
    template renders it: ``<|begin_of_text|>``, then each message's header, its stripped content and
    ``<|eot_id|>``; ``add_generation_prompt`` appends the assistant header (the predict prompt)."""
    text = BOS_TOKEN + "".join(llama3_header(role) + content.strip() + EOT for role, content in messages)
    return text + llama3_header("assistant") if add_generation_prompt else text


# ---------------------------------------------------------------------------------------------
# Jinja chat templates (transformers' semantics): the `llama2`, `chatml` and `hf` templates
# ---------------------------------------------------------------------------------------------

# Llama 2 chat: meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template, verbatim
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# ChatML (OpenAI's; Qwen, SmolLM): `<|im_start|>{role}\n{content}<|im_end|>\n` per message
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_END = "<|im_end|>"


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' AssistantTracker): renders its body and,
    while ``spans`` is a list, records the body's character span in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller):
        text = caller()
        if self.environment.tracking is not None:
            blocks, spans = self.environment.tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """``source`` compiled as transformers compiles chat templates: sandboxed, trim_blocks and lstrip_blocks,
    loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.tracking = None
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source)


def render_chat(source: str, messages: list[dict], special_tokens: dict[str, str],
                add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` in Jinja chat template ``source``, with the globals transformers'
    ``apply_chat_template`` passes (messages, tools, documents, add_generation_prompt and the special
    tokens' texts: bos_token, eos_token, ...). TemplateError for a conversation the template refuses."""
    return compile_chat_template(source).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt, **special_tokens)


def assistant_spans(source: str, messages: list[dict], special_tokens: dict[str, str]) -> tuple[str, list]:
    """The rendered conversation and the character spans of what the assistant says (trained on).

    With ``{% generation %}`` in the template, its blocks; else, as trainers do, by rendering prefixes:
    assistant message i spans from the end of messages[:i] rendered with the generation prompt to the end
    of messages[:i+1] (its content and end-of-turn text). ValueError when a prefix is not a prefix of the
    whole text (a template that rewrites earlier turns cannot be masked this way)."""
    if "generation" in source and re.search(r"\{%-?\s*generation\s*-?%\}", source):
        template, blocks, spans = compile_chat_template(source), [], []
        template.environment.tracking = (blocks, spans)
        try:
            for block in template.generate(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=False, **special_tokens):
                blocks.append(block)
        finally:
            template.environment.tracking = None
        return "".join(blocks), spans
    text, spans = render_chat(source, messages, special_tokens), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render_chat(source, messages[:i], special_tokens, add_generation_prompt=True)
        end = render_chat(source, messages[:i + 1], special_tokens)
        if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"the chat template does not render message {i}'s prefix as a prefix of the whole "
                             "conversation, so its answer cannot be located; add {% generation %} blocks to it")
        spans.append((len(start), len(end)))
    return text, spans


def record_messages(record, index: int) -> list[dict]:
    """``[{role, content}, ...]`` of a conversation record: ``{"conversations": [{from: human|gpt|system,
    value}]}`` (roles user/assistant/system) or ``{"messages": [{role, content}]}``. RecordError names the
    field; at least one assistant message is required."""
    if isinstance(record, dict) and "messages" in record and "conversations" not in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif isinstance(record, dict) and "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise RecordError(index, "conversations", "is missing (a record holds 'conversations' or 'messages')")
    field = "messages" if role_key == "role" else "conversations"
    if not isinstance(turns, list) or not turns:
        raise RecordError(index, field, "must be a non-empty list of turns")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise RecordError(index, f"{field}[{j}]", f"must be an object with a string {text_key!r}")
        role = _CHAT_ROLES.get(turn.get(role_key))
        if role is None:
            raise RecordError(index, f"{field}[{j}].{role_key}", f"is {turn.get(role_key)!r}; expected one of "
                              f"{', '.join(sorted(_CHAT_ROLES))}")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(index, field, "has no assistant ('gpt') answer")
    return messages


_CHAT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
