"""Data preparation: tokenization to Megatron .bin/.idx (and the Spark job)."""
