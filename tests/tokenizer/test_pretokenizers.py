"""Byte-level pre-tokenizers per `tokenizer.ggml.pre`: hand-written splits (the regexes of
llama.cpp's llama-vocab.cpp applied by hand), then whole vocabularies trained with each
pre-tokenizer, written to GGUF, and compared with transformers' loading of the same file."""

from __future__ import annotations

import pytest

from tests.tokenizer.conftest import assert_same_ids, reference_tokenizer
from tests.tokenizer.gguf_tokenizers import SPECIALS, train_byte_level, write_tokenizer_gguf
from tokenizer import PRE_TOKENIZERS, TokenizerError, byte_level_pre_tokenizer, load_tokenizer
from tokenizer.build import byte_to_char

_CHAR_TO_BYTE = {char: byte for byte, char in byte_to_char().items()}


def pieces(pre: str, text: str) -> list[str]:
    """The pre-tokenizer's pieces, mapped back from the byte alphabet to text."""
    splits = byte_level_pre_tokenizer(pre).pre_tokenize_str(text)
    return [bytes(_CHAR_TO_BYTE[c] for c in piece).decode("utf-8") for piece, _ in splits]


LLAMA3_SPLITS = {
    "1234567": ["123", "456", "7"],  # digit runs of one to three
    " 12345": [" ", "123", "45"],
    "3.14": ["3", ".", "14"],
    "$100": ["$", "100"],
    "I'm here": ["I", "'m", " here"],  # contractions
    "WE'LL": ["WE", "'LL"],  # case-insensitive
    "don't": ["don", "'t"],
    "你好世界": ["你好世界"],  # CJK letters stay together
    "你好，世界！": ["你好", "，世界", "！"],  # one non-letter may lead a word
    "hello,world": ["hello", ",world"],
    "Hi!!! ??? --- ...": ["Hi", "!!!", " ???", " ---", " ..."],  # punctuation runs
    "...\n": ["...\n"],  # newlines stick to punctuation
    "x  y": ["x", " ", " y"],
    "a\n\nb": ["a", "\n\n", "b"],
    "  \n  x": ["  \n", " ", " x"],
    "end   ": ["end", "   "],
}
QWEN2_SPLITS = {
    **LLAMA3_SPLITS,
    "1234567": ["1", "2", "3", "4", "5", "6", "7"],  # single digits
    " 12345": [" ", "1", "2", "3", "4", "5"],
    "3.14": ["3", ".", "1", "4"],
    "$100": ["$", "1", "0", "0"],
    "abc123def": ["abc", "1", "2", "3", "def"],
}
GPT2_SPLITS = {
    "abc 123": ["abc", " 123"],
    "I'm": ["I", "'m"],
    "I'M": ["I", "'", "M"],  # case-sensitive contractions
    "Hi!!! ???": ["Hi", "!!!", " ???"],
    "x  y": ["x", " ", " y"],
}
SMOLLM_SPLITS = {
    "abc 123": ["abc", " ", "1", "2", "3"],  # every digit isolated first
    "x² + ½": ["x", "²", " +", " ", "½"],
    "I'm": ["I", "'m"],
}
DEFAULT_SPLITS = {
    "abc 1234567": ["abc", " ", "123", "456", "7"],
    "Hello, world!": ["Hello", ",", " world", "!"],
    "a+=b": ["a", "+=", "b"],
}


@pytest.mark.parametrize(
    ("pre", "cases"),
    [
        ("llama-bpe", LLAMA3_SPLITS),
        ("qwen2", QWEN2_SPLITS),
        ("gpt2", GPT2_SPLITS),
        ("smollm", SMOLLM_SPLITS),
        ("default", DEFAULT_SPLITS),
    ],
)
def test_known_splits(pre, cases):
    for text, expected in cases.items():
        assert pieces(pre, text) == expected, text


def test_aliases_share_a_spec():
    assert PRE_TOKENIZERS["llama3"] is PRE_TOKENIZERS["llama-bpe"]
    assert PRE_TOKENIZERS["gpt-2"] is PRE_TOKENIZERS["gpt2"]
    assert PRE_TOKENIZERS["llama-bpe"].ignore_merges and PRE_TOKENIZERS["llama-bpe"].add_bos
    assert not PRE_TOKENIZERS["qwen2"].add_bos


def test_unknown_pre_names_itself_and_the_supported(tmp_path):
    tokens, merges = train_byte_level("gpt2", vocab_size=400)
    path = write_tokenizer_gguf(
        tmp_path / "x.gguf", model="gpt2", pre="deepseek-coder", tokens=tokens, merges=merges
    )
    with pytest.raises(
        TokenizerError, match="'deepseek-coder'.*supported: .*default.*llama-bpe.*qwen2.*smollm"
    ):
        load_tokenizer(path)


@pytest.fixture(scope="module", params=["qwen2", "llama-bpe", "gpt2"])
def trained(request, tmp_path_factory):
    """A byte-level vocabulary trained with the pre-tokenizer, in a GGUF; ours and transformers'."""
    pre = request.param
    tokens, merges = train_byte_level(pre)
    types = [3 if token in SPECIALS else 1 for token in tokens]
    path = write_tokenizer_gguf(
        tmp_path_factory.mktemp(pre) / "bpe.gguf", model="gpt2", pre=pre, tokens=tokens,
        token_types=types, merges=merges, bos_id=0, eos_id=0,
    )  # fmt: skip
    return pre, load_tokenizer(path), reference_tokenizer(path)


def test_trained_vocabulary_matches_transformers(trained, corpus):
    pre, ours, reference = trained
    expected = dict(
        zip(corpus, reference(corpus, add_special_tokens=False)["input_ids"], strict=True)
    )
    assert_same_ids(
        corpus,
        lambda text: ours.encode(text, add_special_tokens=False),
        expected.__getitem__,
        ours.token_text,
    )
    assert [ours.decode(expected[text]) for text in corpus[:500]] == corpus[:500]
    # Llama 3's files add BOS by default (llama.cpp); transformers' loader reads only the key.
    assert ours.add_bos is (pre == "llama-bpe")
