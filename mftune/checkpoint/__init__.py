"""Checkpoints: name maps, complete and distributed files, loading in any layout, transformation
(``mftune.checkpoint.transform``)."""
from mftune.checkpoint.io import CheckpointError, load_checkpoint, read_metadata, save_complete

__all__ = ["CheckpointError", "load_checkpoint", "read_metadata", "save_complete"]
