"""The tokenizer package's error: a vocabulary, pre-tokenizer or chat template orcd cannot use."""

from jobs.errors import OrcdError


class TokenizerError(OrcdError):
    """GGUF tokenizer metadata orcd cannot turn into a tokenizer, or a chat template that fails."""
