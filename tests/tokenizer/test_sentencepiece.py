"""SentencePiece (`llama`) vocabularies: a BPE model trained by the `sentencepiece` package in
the test, written into a GGUF, loaded by us; compared with SentencePiece's own encoder and with
transformers' loading of the same file."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.tokenizer.conftest import ADDED_KINDS, assert_same_ids
from tests.tokenizer.gguf_tokenizers import (
    sentencepiece_vocab,
    train_sentencepiece,
    write_tokenizer_gguf,
)
from tokenizer import load_tokenizer


def added_texts(case, kinds) -> list[str]:
    return [t for t, kind in zip(case.tokens, case.types, strict=True) if kind in kinds]


def test_vocabulary_has_what_the_test_needs(sentencepiece_case):
    case = sentencepiece_case
    assert case.ours.vocab_size == case.sp.get_piece_size() == 1000
    assert case.types.count(6) == 256  # <0x00>..<0xFF>
    assert "<think>" in case.tokens  # a user-defined token
    # Rare characters were left out of the vocabulary: they need byte fallback.
    assert case.sp.encode("𓂀", out_type=str)[-4:] == ["<0xF0>", "<0x93>", "<0x82>", "<0x80>"]


def test_ids_match_sentencepiece(sentencepiece_case, corpus):
    # Special-token text as plain text, no BOS: exactly what SentencePiece's encoder sees.
    case = sentencepiece_case
    plain = [text for text in corpus if "<think>" not in text]
    checked = assert_same_ids(
        plain,
        lambda text: case.ours.encode(text, add_special_tokens=False, parse_special=False),
        case.sp.encode,
        case.ours.token_text,
    )
    assert checked >= 2000


def test_user_defined_tokens_split_the_text_like_llama_cpp(sentencepiece_case, corpus):
    """A user-defined token is matched even in plain text; the text after it gets its own
    "▁" prefix, as in llama.cpp (and in any tokenizer.json with Llama 2's Prepend normalizer).
    SentencePiece's own encoder writes none there: that is the only difference."""
    case = sentencepiece_case
    with_user_defined = [text for text in corpus if "<think>" in text]
    assert len(with_user_defined) > 20
    assert_same_ids(
        with_user_defined,
        lambda text: case.ours.encode(text, add_special_tokens=False, parse_special=False),
        lambda text: case.split_reference(text, (4,)),
        case.ours.token_text,
    )
    ours = case.ours.encode("a<think>b", add_special_tokens=False)
    assert [case.ours.token_text(i) for i in ours] == ["▁", "a", "<think>", "▁", "b"]
    assert case.sp.encode("a<think>b", out_type=str) == ["▁", "a", "<think>", "b"]


def test_ids_match_sentencepiece_split_at_special_tokens(sentencepiece_case, corpus):
    # Control tokens in the text are single tokens, each stretch of text between them is
    # encoded on its own with its space prefix: llama.cpp's rule (and Meta's Llama 2 code).
    case = sentencepiece_case
    checked = assert_same_ids(
        corpus,
        lambda text: case.ours.encode(text, add_special_tokens=False),
        lambda text: case.split_reference(text, ADDED_KINDS),
        case.ours.token_text,
    )
    assert checked >= 2000


def test_ids_match_transformers(sentencepiece_case, sentencepiece_reference, corpus):
    """transformers loads this file with a Metaspace pre-tokenizer (prepend_scheme "first")
    where Llama 2's tokenizer.json has a Prepend normalizer. Two consequences, both
    departures from SentencePiece: text starting with a space gets no extra "▁" (" hi" is
    "▁hi", SentencePiece writes "▁▁hi"), and text after an added token gets none either.
    Everywhere else the ids must be identical; the two cases are checked against
    SentencePiece above."""
    case = sentencepiece_case
    reference = sentencepiece_reference(corpus, add_special_tokens=False)["input_ids"]
    expected = dict(zip(corpus, reference, strict=True))
    added = added_texts(case, ADDED_KINDS)

    def metaspace_agrees(text: str) -> bool:
        return not text.startswith(" ") and not any(token in text for token in added)

    comparable = [text for text in corpus if metaspace_agrees(text)]
    checked = assert_same_ids(
        comparable,
        lambda text: case.ours.encode(text, add_special_tokens=False),
        expected.__getitem__,
        case.ours.token_text,
    )
    assert checked >= 2000
    reference_hi = sentencepiece_reference(" hi", add_special_tokens=False)["input_ids"]
    assert (
        reference_hi != case.sp.encode(" hi") == case.ours.encode(" hi", add_special_tokens=False)
    )


def test_add_bos_default_and_from_metadata(sentencepiece_case, sentencepiece_reference, tmp_path):
    # The file is silent: llama.cpp's (and transformers') default for SentencePiece adds BOS.
    case = sentencepiece_case
    assert case.ours.add_bos is True and case.ours.add_eos is False
    for text in ("hello", "a b c", "x\ny", ""):
        ids = case.ours.encode(text)
        assert ids[0] == case.sp.bos_id()
        assert ids == sentencepiece_reference(text)["input_ids"]
    tokens, scores, types = sentencepiece_vocab(case.sp)
    path = write_tokenizer_gguf(
        tmp_path / "no_bos.gguf", model="llama", tokens=tokens, token_types=types, scores=scores,
        bos_id=1, eos_id=2, unk_id=0, add_bos=False,
    )  # fmt: skip
    assert load_tokenizer(path).encode("hello") == case.sp.encode("hello")


def test_no_space_prefix_from_metadata(sentencepiece_case, tmp_path):
    case = sentencepiece_case
    tokens, scores, types = sentencepiece_vocab(case.sp)
    path = write_tokenizer_gguf(
        tmp_path / "no_prefix.gguf", model="llama", tokens=tokens, token_types=types,
        scores=scores, add_space_prefix=False,
    )  # fmt: skip
    tokenizer = load_tokenizer(path)
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert tokenizer.token_text(ids[0]) != "▁" and not tokenizer.token_text(ids[0]).startswith("▁")
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(tokenizer.encode(" x", add_special_tokens=False)) == " x"


def test_decode_matches_sentencepiece_and_round_trips(sentencepiece_case, corpus):
    case = sentencepiece_case
    for text in corpus:
        plain = case.ours.encode(text, add_special_tokens=False, parse_special=False)
        if "<think>" not in text:
            assert case.ours.decode(plain) == case.sp.decode(plain) == text
        assert case.ours.decode(plain) == text
        parsed = case.ours.encode(text, add_special_tokens=False)
        assert case.ours.decode(parsed) == text


def test_leading_spaces_after_special_tokens(sentencepiece_case):
    ours = sentencepiece_case.ours
    text = "<s>[INST] hi [/INST]</s> x<s>  y"
    ids = ours.encode(text, add_special_tokens=False)
    pieces = [ours.token_text(i) for i in ids]
    assert pieces[:2] == ["<s>", "▁"]  # "▁[INST]": the prefix after <s>
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == "[INST] hi [/INST] x  y"
    with_bos = ours.encode("hello")
    assert ours.decode(with_bos, skip_special_tokens=True) == "hello"
    assert ours.decode(with_bos) == "<s>hello"


def test_unknown_characters_without_byte_fallback(tmp_path, corpus):
    # A model trained without byte fallback writes a run of unknown characters as one <unk>.
    sp = train_sentencepiece(vocab_size=700, byte_fallback=False)
    tokens, scores, types = sentencepiece_vocab(sp)
    assert 6 not in types
    path = write_tokenizer_gguf(
        tmp_path / "unk.gguf", model="llama", tokens=tokens, token_types=types, scores=scores
    )
    ours = load_tokenizer(path)
    plain = [text for text in corpus if "<think>" not in text]
    assert_same_ids(
        plain,
        lambda text: ours.encode(text, add_special_tokens=False, parse_special=False),
        sp.encode,
        ours.token_text,
    )
    assert ours.encode("x𓂀𓂀y", add_special_tokens=False).count(sp.unk_id()) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(sentencepiece_case, text):
    # "▁" in the text is read as a space by every SentencePiece tokenizer: it cannot survive.
    assume("▁" not in text)
    ours = sentencepiece_case.ours
    plain = ours.encode(text, add_special_tokens=False, parse_special=False)
    assert ours.decode(plain) == text
    assert ours.decode(ours.encode(text)) == "<s>" + text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", " ", "  ", "é", "𓂀", "12", "\n"]), max_size=30).map("".join)
)
def test_plain_text_matches_sentencepiece(sentencepiece_case, text):
    case = sentencepiece_case
    assert case.ours.encode(text, add_special_tokens=False) == case.sp.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_matches_sentencepiece_on_any_ids(sentencepiece_case, data):
    # Any normal and byte tokens, broken UTF-8 included: one U+FFFD per invalid byte, as
    # SentencePiece writes it.
    case = sentencepiece_case
    usable = [i for i, kind in enumerate(case.types) if kind in (1, 6)]
    ids = data.draw(st.lists(st.sampled_from(usable), max_size=30))
    assert case.ours.decode(ids) == case.sp.decode(ids)


def test_prefix_is_dropped_only_from_a_leading_space_piece(sentencepiece_case):
    # SentencePiece drops the space prefix only from a first piece that starts with "▁"; a
    # <0x20> byte token (never produced by the encoder, but a model may emit one) stays.
    case = sentencepiece_case
    ids = [case.tokens.index("<0x20>"), case.tokens.index("a")]
    assert case.ours.decode(ids) == case.sp.decode(ids) == " a"
    detokenizer = case.ours.detokenizer()
    assert "".join(detokenizer.push(i) for i in ids) == " a"
