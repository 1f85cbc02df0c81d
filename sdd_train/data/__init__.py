"""Data: the embedded default corpus, tokenizer, and batch sampling."""
