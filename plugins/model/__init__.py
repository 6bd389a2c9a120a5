"""Model-component plugins: position encodings, attention kernels, norms, MLPs and output heads."""
