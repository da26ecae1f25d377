"""Hugging Face cache inspection and downloads. No torch."""
