"""Tiny Hugging Face tokenizer directories for tests, built the way real checkpoints ship them.

- ``bpe_directory``: a byte-level BPE ``tokenizer.json`` trained by the ``tokenizers`` library on
  ``CORPUS`` (Llama 3 / SmolLM / Qwen-style), Llama 3's special tokens, a post-processor that puts bos
  first, saved by transformers' ``PreTrainedTokenizerFast.save_pretrained`` (tokenizer_config.json with
  the chat template), plus config.json / generation_config.json with a list of eos ids.
- ``sp_directory``: a SentencePiece ``tokenizer.model`` (mftune's Llama-like trainer) saved by
  transformers' ``LlamaTokenizer.save_pretrained``.

``SAMPLE`` is the multilingual text the ids are compared on (English, Chinese, emoji, code, whitespace
runs, special tokens' texts).
"""
from __future__ import annotations

import json
import os

from mftune.data.conversation import LLAMA2_CHAT_TEMPLATE

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "我们今天去公园散步，天气很好。机器学习是人工智能的一个分支。",
    "Emoji time 😀🎉🚀 and 👍🏽 with text.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(i)  # comment",
    "   leading spaces\n\n\nmany newlines    and  tabs\t\tend   ",
    "User asked: What is 2 + 2? Assistant said: 4. You are a helpful assistant.",
] * 4
SAMPLE = ("Hello world! 你好，世界。 Emoji 😀🚀 code: `def f(x):\n    return x ** 2`   spaces\t\ttabs\n\n"
          "<|begin_of_text|>special<|eot_id|> end")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# Llama 3 Instruct's chat template (Meta's tokenizer_config.json, without the date/tools parts)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML (Qwen / SmolLM-style)
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 2 chat: meta-llama/Llama-2-7b-chat-hf's template, the text the `llama2` template ships
LLAMA2_JINJA = LLAMA2_CHAT_TEMPLATE


def bpe_tokenizer_object(vocab_size: int = 800, bos: str | None = "<|begin_of_text|>"):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on CORPUS, bos put first by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def bpe_directory(path: str, chat_template: str | None = LLAMA3_JINJA, *, bos: str | None = "<|begin_of_text|>",
                  eos: str = "<|end_of_text|>", pad: str | None = None, model_eos: list[int] | None = None) -> str:
    """A Hugging Face tokenizer directory with a trained tokenizer.json (module docstring); returns ``path``."""
    from transformers import PreTrainedTokenizerFast

    tok = bpe_tokenizer_object(bos=bos)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    eos_ids = model_eos if model_eos is not None else [tok.token_to_id(eos), tok.token_to_id("<|eot_id|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_ids}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "eos_token_id": eos_ids[0]}, f)
    return path


def sp_directory(path: str, model_file: str, chat_template: str | None = LLAMA2_JINJA) -> str:
    """A Hugging Face directory of transformers' LlamaTokenizer over SentencePiece ``model_file``."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=model_file)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    return path
