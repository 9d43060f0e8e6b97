"""Tokenizing and labelling a conversation in Llama 3's chat format (the ``llama3`` template).

A sample is ``<|begin_of_text|>`` then, per message, its header
``<|start_header_id|>{role}<|end_header_id|>\\n\\n``, its content and ``<|eot_id|>``: the same ids as
transformers' ``apply_chat_template(..., tokenize=True)`` with Meta's Llama 3 chat template. Labels
train on each assistant message's content and its ``<|eot_id|>`` (the model learns to stop); the
begin token, every header and the other roles' messages are -100. Records are cut at, or padded
with the pad id to, ``record_length`` (seq_length + 1) tokens.
"""
from __future__ import annotations

import re

from mftune.data.conversation import llama3_header
from mftune.data.labelling import IGNORE_TOKEN_ID, Tokenized, batch_columns, fit_record
from mftune.data.tiktoken_tokenizer import BOS_TOKEN, END_HEADER, EOT, START_HEADER
from mftune.data.tokenizer_kinds import Tokenizer
from mftune.errors import DataError

_MESSAGE = re.compile(re.escape(START_HEADER) + r"(system|user|assistant)" + re.escape(END_HEADER) + "\n\n(.*?)"
                      + re.escape(EOT), re.S)


def split_messages(text: str) -> list[tuple[str, str]]:
    """``(role, content)`` of each message of a rendered Llama 3 conversation (``llama3_prompt``'s text)."""
    if not text.startswith(BOS_TOKEN):
        raise DataError(f"a llama3-template sample must start with {BOS_TOKEN}: {text[:60]!r}")
    messages, at = [], len(BOS_TOKEN)
    while at < len(text):
        m = _MESSAGE.match(text, at)
        if m is None:
            raise DataError(f"not a Llama 3 message at character {at} of a llama3-template sample: "
                            f"{text[at:at + 60]!r}")
        messages.append((m.group(1), m.group(2)))
        at = m.end()
    return messages


def tokenize_llama3_prompts(prompts: list[str], tokenizer: Tokenizer, record_length: int) -> list[Tokenized]:
    """Each rendered conversation's ids and labels (see the module docstring); one batched encode."""
    conversations = [split_messages(p) for p in prompts]
    texts = [t for messages in conversations for role, content in messages for t in (llama3_header(role), content)]
    encoded = iter(tokenizer.encode_batch(texts))
    eot, pad = tokenizer.encode_batch([EOT])[0], tokenizer.pad_token_id
    out = []
    for messages in conversations:
        ids, labels = [tokenizer.bos_token_id], [IGNORE_TOKEN_ID]
        for role, _ in messages:
            header, body = next(encoded), next(encoded) + eot
            ids += header + body
            labels += [IGNORE_TOKEN_ID] * len(header) + (body if role == "assistant" else [IGNORE_TOKEN_ID] * len(body))
        out.append(fit_record(ids, labels, record_length, pad))
    return out


def tokenize_batch(batch: dict, tokenizer: Tokenizer, record_length: int, pad: bool = True) -> dict:
    """``datasets.map`` function over rendered conversations (``labelling.tokenize_batch``'s columns)."""
    return batch_columns(tokenize_llama3_prompts(batch["text"], tokenizer, record_length), record_length, pad)
