"""Data: Llama tokenizers (SentencePiece, Llama 3's tiktoken), conversation templates, record reading,
labelling, packing, preprocessing, the dataset a run reads and its training batches."""
from mftune.data.conversation import alpaca_prompt, get_default_conv_template, vicuna_prompt
from mftune.data.labelling import IGNORE_TOKEN_ID, tokenize_prompt
from mftune.data.loader import TrainData
from mftune.data.tiktoken_tokenizer import Llama3Tokenizer
from mftune.data.tokenizer import LlamaTokenizer, train_sentencepiece
from mftune.data.tokenizer_kinds import build_tokenizer
from mftune.errors import DataError, RecordError

__all__ = ["IGNORE_TOKEN_ID", "DataError", "Llama3Tokenizer", "LlamaTokenizer", "RecordError", "TrainData",
           "alpaca_prompt", "build_tokenizer", "get_default_conv_template", "tokenize_prompt", "train_sentencepiece",
           "vicuna_prompt"]
