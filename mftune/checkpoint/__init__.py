"""Checkpoints, in layers (imports go down the list):

- ``safetensors_io``: the byte level (header parsing, block reads, streaming and atomic writes);
- ``keys``: names in a checkpoint besides model weights (LoRA marks, optimizer moments, counters);
  ``names``: Hugging Face <-> mftune names and configs;
- ``entries``: ``Entry``, one tensor that reads any block of itself;
- ``formats``: one module per on-disk format, each turning a path into entries and a header, and
  the one function that recognises a path's format;
- ``load``: ``load_checkpoint`` into a model of any layout; ``model_weights``: the weights a
  model_config has;
- ``convert``, ``transform``, ``merge``, ``export``: the tools, consumers of entries.
"""
from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.safetensors_io import read_metadata
from mftune.errors import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "read_metadata", "save_complete"]
