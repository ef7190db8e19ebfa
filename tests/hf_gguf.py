"""transformers on GGUF files, parsing each file once.

transformers' GGUF loading reads a file's header afresh for the tokenizer, the config and the
weights, each time through gguf's GGUFReader, which parses every vocabulary entry in Python
(4 s for Qwen2's 152k tokens here, 8 s for Llama 3's). Inside `parse_once()` a file is parsed
the first time it is opened and the same read-only reader is handed out after that: what
transformers builds from it is the same, the tests only stop paying for the repeats.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def parse_once() -> Iterator[None]:
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    def reader(path: os.PathLike | str, mode: str = "r") -> gguf.GGUFReader:
        if mode != "r":  # writable memory maps are not shared
            return original(path, mode)
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield
