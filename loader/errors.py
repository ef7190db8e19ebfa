"""The loader's own error; `OrcdError`, the root of every orcd error, is `jobs.errors`'s."""

from jobs.errors import OrcdError

__all__ = ["GGUFError", "OrcdError"]


class GGUFError(OrcdError):
    """A GGUF file is malformed, truncated, or uses something orcd does not support."""
