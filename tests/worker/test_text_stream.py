"""Stop strings across token boundaries, never emitted; deltas add up to the decoded text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer.tokenizer import load_tokenizer
from worker.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def stream_all(tokenizer, text: str, stops) -> tuple[str, list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    deltas = [stream.push([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    deltas.append(stream.finish())
    return "".join(deltas), deltas, stream


def test_no_stop_equals_decode(tokenizer):
    text = "Ünïcödé and emoji 👩‍👩‍👧 split over byte tokens, then code: def f(x): return x"
    out, _, stream = stream_all(tokenizer, text, [])
    assert out == text == stream.text and not stream.stopped


def test_stop_spanning_tokens_is_cut_and_not_emitted(tokenizer):
    text = "The answer is 42. Observation: the sky is blue."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert not any("Observation:" in p for p in pieces)  # the stop spans several tokens
    out, deltas, stream = stream_all(tokenizer, text, ["Observation:"])
    assert out == "The answer is 42. " and stream.stopped
    assert stream.stop_reason == "Observation:"
    assert all("Obs" not in d for d in deltas)


def test_earliest_of_several_stops_wins(tokenizer):
    out, _, stream = stream_all(tokenizer, "alpha beta gamma delta", ["delta", " beta"])
    assert out == "alpha" and stream.stop_reason == " beta"


def test_partial_stop_prefix_is_released_at_the_end(tokenizer):
    out, _, stream = stream_all(tokenizer, "ends with Obs", ["Observation"])
    assert out == "ends with Obs" and not stream.stopped


def test_nothing_after_stop(tokenizer):
    stream = TextStream(tokenizer, ["\n"])
    first = stream.push(tokenizer.encode("line one\nline two", add_special_tokens=False))
    assert first == "line one" and stream.stopped
    assert stream.push(tokenizer.encode(" more", add_special_tokens=False)) == ""
    assert stream.finish() == ""


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab cd\n.é", min_size=1, max_size=40), data=st.data())
def test_output_is_text_up_to_first_stop(tokenizer, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 4))]
    out, _, stream = stream_all(tokenizer, text, [stop])
    assert out == text[: text.index(stop)]
    assert stream.stopped
