"""orcd tokenizer package."""
