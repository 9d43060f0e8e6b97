"""Data: Llama tokenizer, Vicuna/alpaca templates, record reading, labelling, packing, preprocessing,
the dataset a run reads and its training batches."""
from mftune.data.conversation import alpaca_prompt, get_default_conv_template, vicuna_prompt
from mftune.data.labelling import IGNORE_TOKEN_ID, tokenize_prompt
from mftune.data.loader import TrainData
from mftune.data.tokenizer import LlamaTokenizer, train_sentencepiece
from mftune.errors import DataError, RecordError

__all__ = ["IGNORE_TOKEN_ID", "DataError", "LlamaTokenizer", "RecordError", "TrainData", "alpaca_prompt",
           "get_default_conv_template", "tokenize_prompt", "train_sentencepiece", "vicuna_prompt"]
