"""Checkpoints: name maps, complete files, (later) distributed save/load and resharding."""
from mftune.checkpoint.io import CheckpointError, load_checkpoint, read_metadata, save_complete

__all__ = ["CheckpointError", "load_checkpoint", "read_metadata", "save_complete"]
