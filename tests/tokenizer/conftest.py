"""Shared fixtures: the default model's tokenizer (ours and transformers'), a SentencePiece
model trained in memory and written to a GGUF, and the test corpus. Each is built once per
session: transformers' GGUF loading takes seconds."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
from gguf import TokenType

from tests.tokenizer.corpus import build_corpus
from tests.tokenizer.gguf_tokenizers import (
    sentencepiece_vocab,
    train_sentencepiece,
    write_tokenizer_gguf,
)
from tokenizer import GGUFTokenizer, load_tokenizer


def reference_tokenizer(path: Path):
    """transformers' tokenizer for a GGUF file: the independent reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_ids(
    corpus: Sequence[str],
    ours: Callable[[str], list[int]],
    reference: Callable[[str], list[int]],
    describe: Callable[[int], str] = str,
) -> int:
    """Compare ids string by string; on failure name the first mismatch and count them all."""
    mismatches = [(text, ours(text), reference(text)) for text in corpus]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    if mismatches:
        text, got, expected = mismatches[0]
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        pytest.fail(
            f"{len(mismatches)} of {len(corpus)} strings differ; first: {text!r}\n"
            f"  first difference at position {first_diff}\n"
            f"  ours:      {got}\n  {[describe(i) for i in got]}\n"
            f"  reference: {expected}\n  {[describe(i) for i in expected]}"
        )
    return len(corpus)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    strings = build_corpus()
    assert len(strings) >= 2000
    return strings


@pytest.fixture(scope="session")
def smollm(default_model_path) -> GGUFTokenizer:
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def smollm_reference(default_model_path):
    return reference_tokenizer(default_model_path)


@dataclass
class SentencePieceCase:
    """A SentencePiece model, the GGUF written from it, and tokenizers loaded from that."""

    sp: spm.SentencePieceProcessor
    path: Path
    tokens: list[str]
    types: list[int]
    ours: GGUFTokenizer

    def split_reference(self, text: str, kinds: Sequence[int]) -> list[int]:
        """SentencePiece's ids for `text`, cut at tokens of the given types the way llama.cpp
        does: each piece of text encoded on its own (with its own space prefix)."""
        added = [t for t, kind in zip(self.tokens, self.types, strict=True) if kind in kinds]
        pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        ids, position = [], 0
        for match in pattern.finditer(text):
            if match.start() > position:
                ids += self.sp.encode(text[position : match.start()])
            ids.append(self.tokens.index(match.group()))
            position = match.end()
        if position < len(text):
            ids += self.sp.encode(text[position:])
        return ids


@pytest.fixture(scope="session")
def sentencepiece_case(tmp_path_factory) -> SentencePieceCase:
    sp = train_sentencepiece()
    tokens, scores, types = sentencepiece_vocab(sp)
    path = write_tokenizer_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        unk_id=sp.unk_id(),
    )
    return SentencePieceCase(sp, path, tokens, [int(t) for t in types], load_tokenizer(path))


@pytest.fixture(scope="session")
def sentencepiece_reference(sentencepiece_case):
    return reference_tokenizer(sentencepiece_case.path)


SPECIAL_KINDS = (TokenType.CONTROL, TokenType.UNKNOWN)
ADDED_KINDS = (*SPECIAL_KINDS, TokenType.USER_DEFINED)
