"""Parallelism applied from outside the single-device model: mesh, TP/SP, pipeline, FSDP2, checkpointing."""
