"""The root of orcd's error hierarchy and the loader's own error.

`OrcdError` lives here because `loader` is the lowest layer: every other package may import
it, and it imports nothing of ours.
"""


class OrcdError(Exception):
    """Any error orcd raises on purpose; its message names the thing and the reason in one line."""


class GGUFError(OrcdError):
    """A GGUF file is malformed, truncated, or uses something orcd does not support."""
