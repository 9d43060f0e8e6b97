"""A tiny Llama 3-style tiktoken ``tokenizer.model`` for the tests (nothing can be downloaded).

The ranks are trained with tiktoken's own reference trainer (``tiktoken._educational.bpe_train``) and
Llama 3's split pattern on a small multilingual corpus (English, Chinese, emoji, code, whitespace
runs), then written the way Meta's file is: ``<base64 token> <rank>`` per line. All 256 single bytes
are ranks, so any text encodes; the 256 special tokens follow the base vocabulary as in Llama 3.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os

from tiktoken._educational import bpe_train

from mftune.data.tiktoken_tokenizer import PAT_STR

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat a balanced diet.\n"
    "2. Exercise regularly.\n3. Get enough sleep.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. "
    "USER: Hello! ASSISTANT: Hi, how can I help?",
    "人工智能是计算机科学的一个分支。机器学习让计算机从数据中学习。我们今天学习中文和英文。",
    "Emoji: 😀😃🎉👍🏽 and flags 🇨🇳🇫🇷 — also café, naïve, Straße, 東京.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))  # 0, 3, 6 ...\n",
    "Whitespace   runs\t\tand\n\n\nnewlines    end here.   ",
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see they've done it; we'd agree it's fine.",
]
# What the tokenizer tests encode: every script and shape above, plus text the corpus never saw.
SAMPLE_TEXTS = [
    "Hello world! The assistant gives helpful answers.",
    "人工智能和机器学习很有趣。",
    "Party time 🎉🎉 👍🏽 ok?",
    "def mul(x, y):\n    return x * y   # product\n",
    "a  b   c\t\td\n\n\ne   ",
    "   leading spaces and trailing newline\n",
    "Numbers 1234567 and 3.14159, I'll, YOU'RE, it's.",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|> tail",
    "unseen words: zygote quasar xylophone 量子计算",
]


def train_ranks(vocab_size: int = 600) -> dict[bytes, int]:
    """BPE ranks (``{token bytes: rank}``) trained on ``CORPUS``; deterministic, well under a second."""
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its merges
        return bpe_train("\n".join(CORPUS), vocab_size, PAT_STR)


def write_tiktoken_file(path: str | os.PathLike, ranks: dict[bytes, int] | None = None) -> str:
    """Write ``ranks`` (default ``train_ranks()``) as a tiktoken file at ``path``; return the path."""
    ranks = train_ranks() if ranks is None else ranks
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(path)
