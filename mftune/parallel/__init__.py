"""Parallelism applied to a plain model (tensor/sequence parallel, FSDP2): see the multi-rank issue."""
