"""The job's stages, one module each, in the order of the Baichuan 2 report."""
