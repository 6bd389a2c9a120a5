"""Tools: tokenizer training, benchmarks, demo corpus."""
