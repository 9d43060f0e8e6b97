"""MindSpore's checkpoint files at the byte level, read and written without MindSpore.

- ``wire``: the part of Protocol Buffers' wire format the files use (fields of a message, read
  from a file region without loading it; the few field kinds written);
- ``ckpt``: ``.ckpt`` files (a stream of ``Checkpoint.Value`` messages): the index of a file, block
  reads of one tensor, the streaming writer;
- ``strategy``: MindSpore's parallel strategy files (``ParallelStrategyMap`` protobuf, or its JSON
  form): which block of each tensor every rank of a distributed checkpoint holds;
- ``names``: MindFormers' counters and training state <-> mftune's.

The checkpoint formats (``mftune.checkpoint.formats.mindspore_ckpt``, ``...mindspore_ranks``) turn
these into entries.
"""
