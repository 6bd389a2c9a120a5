"""Alignment data: the synthetic task, response collection, preference pairs, prompt taxonomy."""
