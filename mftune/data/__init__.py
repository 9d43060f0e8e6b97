"""Data: Llama tokenizer, Vicuna/alpaca templates, MindFormers-style preprocessing, training batches."""
from mftune.data.conversation import alpaca_prompt, get_default_conv_template, vicuna_prompt
from mftune.data.loader import TrainData
from mftune.data.preprocess import IGNORE_TOKEN_ID, DataError, RecordError, tokenize_prompt
from mftune.data.tokenizer import LlamaTokenizer, train_sentencepiece

__all__ = ["IGNORE_TOKEN_ID", "DataError", "LlamaTokenizer", "RecordError", "TrainData", "alpaca_prompt",
           "get_default_conv_template", "tokenize_prompt", "train_sentencepiece", "vicuna_prompt"]
