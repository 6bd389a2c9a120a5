"""The haina command and its jobs: HF interchange, evaluation, alignment data, demo, benchmarks, tokenizer."""
