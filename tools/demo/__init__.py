"""The end-to-end demo: embedded corpus, pretraining run, alignment stages."""
