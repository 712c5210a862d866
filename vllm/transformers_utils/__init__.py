"""Tokenizer loading and incremental detokenization (Hugging Face transformers)."""
