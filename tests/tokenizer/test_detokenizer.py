"""The streaming detokenizer, on both vocabulary kinds: complete UTF-8 only, characters split
over tokens emitted once and whole, deltas adding up to the full decode."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def stream(tokenizer, ids, skip_special_tokens=True):
    detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.push(i) for i in ids]
    return deltas, detokenizer.finish()


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def any_tokenizer(request, smollm, sentencepiece_case):
    return smollm if request.param == "byte-level" else sentencepiece_case.ours


def test_byte_level_characters_split_over_tokens(smollm):
    text = "naïve 日本語 🙂👩‍👩‍👧 done"
    ids = smollm.encode(text)
    pieces = [smollm.token_text(i) for i in ids]
    assert "ðŁ" in pieces  # the first two bytes of 👩 (F0 9F ...): a token, not a character
    deltas, tail = stream(smollm, ids)
    assert "".join(deltas) + tail == text and tail == ""
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas  # held back while a character was incomplete
    assert any("👩" in delta for delta in deltas)  # ...and emitted whole afterwards
    for char in "ï日本語🙂👩👧":
        assert sum(char in delta for delta in deltas) == text.count(char)


def test_sentencepiece_byte_fallback_split_over_tokens(sentencepiece_case):
    ours = sentencepiece_case.ours
    ids = ours.encode("x 𓂀ǅ y", add_special_tokens=False)
    pieces = [ours.token_text(i) for i in ids]
    assert pieces[pieces.index("<0xF0>") : pieces.index("<0xF0>") + 4] == [
        "<0xF0>", "<0x93>", "<0x82>", "<0x80>",
    ]  # fmt: skip
    deltas, tail = stream(ours, ids)
    start = pieces.index("<0xF0>")
    assert deltas[start : start + 4] == ["", "", "", "𓂀"]
    assert "".join(deltas) + tail == "x 𓂀ǅ y"


def test_sentencepiece_leading_spaces(sentencepiece_case):
    ours = sentencepiece_case.ours
    ids = ours.encode("hello world")  # <s> ▁hello ▁world
    assert ids[0] == ours.bos_id
    deltas, _ = stream(ours, ids)
    assert deltas[0] == ""  # <s>, skipped
    assert "".join(deltas) == "hello world"  # the prefix of "▁hello" is gone, "▁world" keeps it
    assert "".join(stream(ours, ids[1:])[0]) == "hello world"  # also without the BOS
    ids = ours.encode("a</s><s> b<s>c", add_special_tokens=False)
    kept, _ = stream(ours, ids, skip_special_tokens=False)
    assert "".join(kept) == "a</s><s> b<s>c"  # one prefix dropped after each special token
    skipped, _ = stream(ours, ids)
    assert "".join(skipped) == "a bc" == ours.decode(ids, skip_special_tokens=True)


def test_incomplete_character_at_the_end(any_tokenizer):
    ids = any_tokenizer.encode("ok 👩𓂀", add_special_tokens=False)[:-1]
    deltas, tail = stream(any_tokenizer, ids)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + tail == any_tokenizer.decode(ids)
    assert tail.startswith("\ufffd")


def test_stream_equals_decode_on_corpus(any_tokenizer, corpus):
    for text in corpus[:800]:
        ids = any_tokenizer.encode(text)
        for skip in (True, False):
            deltas, tail = stream(any_tokenizer, ids, skip)
            assert "".join(deltas) + tail == any_tokenizer.decode(ids, skip_special_tokens=skip)


def test_cost_per_token_does_not_grow(any_tokenizer, corpus):
    ids = [i for text in corpus for i in any_tokenizer.encode(text, add_special_tokens=False)]
    ids = (ids * (60_000 // len(ids) + 1))[:60_000]
    detokenizer = any_tokenizer.detokenizer()
    start = time.perf_counter()
    for token_id in ids:
        detokenizer.push(token_id)
    # Linear: ~1 µs a token. Re-decoding the whole sequence each step would take minutes.
    assert time.perf_counter() - start < 3.0


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_deltas_add_up_to_decode(any_tokenizer, data):
    # Any ids at all, including broken byte sequences and special tokens in between.
    size = any_tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(0, size - 1), max_size=40))
    skip = data.draw(st.booleans())
    deltas, tail = stream(any_tokenizer, ids, skip)
    assert "".join(deltas) + tail == any_tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_streamed_text_is_the_text(sentencepiece_case, text):
    ours = sentencepiece_case.ours
    ids = ours.encode(text, parse_special=False)
    deltas, tail = stream(ours, ids)
    assert tail == "" and all("\ufffd" not in d for d in deltas if "\ufffd" not in text)
    assert "".join(deltas) == ours.decode(ids, skip_special_tokens=True)
