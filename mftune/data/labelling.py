"""Tokenizing a Vicuna-templated conversation and labelling it the way MindFormers'
``llama_preprocess.py`` does (only the assistant's answers are trained on).
"""
from __future__ import annotations

import dataclasses
import json

from mftune.data.conversation import get_default_conv_template
from mftune.data.tokenizer_kinds import Tokenizer

IGNORE_TOKEN_ID = -100


@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]   # record_length ids, pad-filled
    labels: list[int]      # record_length labels, -100 where not trained on
    truncated: bool
    num_tokens: int        # non-pad ids kept
    length: int            # ids before padding (<= record_length)


def tokenize_prompt(prompt: str, tokenizer: Tokenizer, record_length: int) -> Tokenized:
    """Tokenize one Vicuna prompt and mask its labels the way MindFormers does.

    ids = [<s>] + per round (split on "</s>") its tokens + [</s>]; pad with pad id (0) to
    `record_length` (= seq_length + 1) or cut to it. Labels copy ids, with -100 on <s>, on each
    round's instruction part (`len(encode(instruction + " ASSISTANT: ", bos, eos)) - 3` tokens:
    minus <s>, </s> and the trailing "▁"), and on everything after the last round. If the length
    so computed differs from the count of non-pad ids (an <unk>=pad token inside the text, or a
    round that does not split into exactly one instruction and answer), every label is -100.
    Checked against a transcription of MindFormers' code on the sample data and edge cases; the
    one difference: a sample that is both too long and fully masked keeps MindFormers' labels
    uncut there (longer than its input_ids), here both are record_length long.
    """
    return tokenize_prompts([prompt], tokenizer, record_length)[0]


def tokenize_prompts(prompts: list[str], tokenizer: Tokenizer, record_length: int) -> list[Tokenized]:
    """``tokenize_prompt`` of each prompt; the texts of all of them are encoded in two batched
    tokenizer calls (rounds, instruction parts), which is several times faster than one call each."""
    conv = get_default_conv_template("vicuna")
    sep = conv.sep + conv.roles[1] + ": "
    rounds: list[list[str]] = []
    for prompt in prompts:
        rs = []
        for rou in prompt.split(conv.sep2):
            if rou == "":
                break
            rs.append(rou)
        rounds.append(rs)
    instructions = [[parts[0] + sep if len(parts) == 2 else None for parts in (rou.split(sep) for rou in rs)]
                    for rs in rounds]
    round_ids = iter(tokenizer.encode_batch([r for rs in rounds for r in rs]))
    instruction_ids = iter(tokenizer.encode_batch([i for ins in instructions for i in ins if i is not None]))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for rs, ins in zip(rounds, instructions):
        pieces = [next(round_ids) for _ in rs]  # each round without <s>, </s>
        ids = [bos]
        for piece in pieces:
            ids.extend(piece)
            ids.append(eos)
        full = ids + [pad] * max(0, record_length - len(ids))
        # list.count: C speed on long records; a tokenizer padding with its eos (no pad, no unk) has no pad in text
        total_len = len(ids) - ids.count(pad) if pad != eos else len(ids)

        target = list(full)
        cur_len = 1
        target[:cur_len] = [IGNORE_TOKEN_ID] * cur_len
        instruction_lens = [None if i is None else len(next(instruction_ids)) - 1 for i in ins]
        for piece, instruction_len in zip(pieces, instruction_lens):
            if instruction_len is None:  # not exactly one instruction and one answer
                break
            end = min(cur_len + instruction_len, len(target))
            target[cur_len:end] = [IGNORE_TOKEN_ID] * (end - cur_len)
            cur_len += len(piece) + 1
        target[cur_len:] = [IGNORE_TOKEN_ID] * max(0, len(target) - cur_len)
        if cur_len < record_length and cur_len != total_len:
            target = [IGNORE_TOKEN_ID] * len(target)
        out.append(Tokenized(input_ids=full[:record_length], labels=target[:record_length],
                             truncated=len(ids) > record_length,
                             num_tokens=min(len(ids), record_length) - ids[:record_length].count(pad),
                             length=min(len(ids), record_length)))
    return out


def tokenize_batch(batch: dict, tokenizer: Tokenizer, record_length: int, pad: bool = True) -> dict:
    """``pad``: records of ``record_length``; False: each sample only as long as its tokens (for packing)."""
    return batch_columns(tokenize_prompts(batch["text"], tokenizer, record_length), record_length, pad)


def batch_columns(tokenized: list[Tokenized], record_length: int, pad: bool = True) -> dict:
    """The columns ``datasets.map`` writes for tokenized samples (input_ids, labels and the counts)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_tokens": [], "_labelled": []}
    for t in tokenized:
        n = record_length if pad else t.length
        out["input_ids"].append(t.input_ids[:n])
        out["labels"].append(t.labels[:n])
        out["_truncated"].append(t.truncated)
        out["_tokens"].append(t.num_tokens)
        out["_labelled"].append(len(t.labels) - t.labels.count(IGNORE_TOKEN_ID))
    return out


def char_offsets(tokenizer: Tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Each text's ids (one batched call, no bos/eos) and each id's character span in the text: the
    tokenizers library reports them; for tiktoken they follow from each token's bytes."""
    if hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.encode_with_offsets(texts)
    out = []
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        char_of_byte = [i for i, c in enumerate(text) for _ in c.encode("utf-8")] + [len(text)]
        spans, at = [], 0
        for i in ids:
            end = min(at + len(tokenizer.enc.decode_single_token_bytes(i)), len(char_of_byte) - 1)
            spans.append((char_of_byte[at], char_of_byte[max(end - 1, at)] + 1))
            at = end
        out.append((ids, spans))
    return out

def tokenize_chats(samples: list[str], tokenizer: Tokenizer, record_length: int) -> list[Tokenized]:
    """Chat samples (JSON of the rendered ``text`` and its assistant ``spans``, ``templates``' Jinja
    templates) -> ids of the whole text as one string (transformers' ``apply_chat_template`` ids) and
    labels equal to the ids of the tokens that overlap an assistant span, -100 elsewhere; cut at, or padded
    with the pad id to, ``record_length``."""
    parsed = [json.loads(s) for s in samples]
    out, pad = [], tokenizer.pad_token_id
    for sample, (ids, offsets) in zip(parsed, char_offsets(tokenizer, [p["text"] for p in parsed])):
        spans = sample["spans"]
        labels = [i if any(end > s and start < e for s, e in spans) else IGNORE_TOKEN_ID
                  for i, (start, end) in zip(ids, offsets)]
        out.append(fit_record(ids, labels, record_length, pad))
    return out


def fit_record(ids: list[int], labels: list[int], record_length: int, pad: int) -> Tokenized:
    """A sample's ids and labels cut at, or padded (pad id / IGNORE_TOKEN_ID) to, ``record_length``; every
    id counts as a token (templates whose text has no pad)."""
    n = min(len(ids), record_length)
    fill = record_length - n
    return Tokenized(input_ids=ids[:n] + [pad] * fill, labels=labels[:n] + [IGNORE_TOKEN_ID] * fill,
                     truncated=len(ids) > record_length, num_tokens=n, length=n)


def tokenize_chat_batch(batch: dict, tokenizer: Tokenizer, record_length: int, pad: bool = True) -> dict:
    """``datasets.map`` function over chat samples (``tokenize_batch``'s columns)."""
    return batch_columns(tokenize_chats(batch["text"], tokenizer, record_length), record_length, pad)
