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

The strings are byte-for-byte MindFormers' (and Meta's); tokenisation and the label mask depend on them.
"""
from __future__ import annotations

import dataclasses
from enum import Enum, auto

from mftune.data.tiktoken_tokenizer import BOS_TOKEN, END_HEADER, EOT, START_HEADER


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
