"""Model evaluation: perplexity per data source, safety (harmless-response rate)."""
