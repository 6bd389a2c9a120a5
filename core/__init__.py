"""haina engine: config, model assembly, training loop, checkpoints, metrics, data loading."""
