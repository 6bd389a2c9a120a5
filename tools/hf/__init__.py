"""Hugging Face interchange: export a haina checkpoint, import an HF model directory."""
