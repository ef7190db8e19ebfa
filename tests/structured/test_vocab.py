"""The vocabulary llguidance gets, on both kinds the project supports: SmolLM2's byte-level BPE
and a SentencePiece (llama) vocabulary with byte fallback, as `orcd synth` builds one.

Checked against independent facts: every token's bytes are the text our detokenizer writes for
it (its tests compare it with transformers); control tokens are special, so no grammar spells
them; a literal grammar walked along our tokenizer's ids for text with spaces, accents and
characters that need byte tokens allows every id; end-of-generation ids are allowed exactly when
the grammar accepts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import TokenType

from loader.synth_vocab import default_vocabulary, sentencepiece_vocabulary
from structured import GrammarSpec, bitmask_words, fill_bitmasks, llg_tokenizer
from structured.matcher import GrammarMatcher
from tests.tokenizer.gguf_tokenizers import write_tokenizer_gguf
from tokenizer import load_tokenizer

TEXT = " Grüße, ｗｏｒｌｄ ✓ — naïve café 123 {\"a\": [1, 2]} 🙂"


@pytest.fixture(scope="module")
def byte_level(default_model_path):
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    vocab = sentencepiece_vocabulary(default_vocabulary(), 4096)
    path = write_tokenizer_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf", model="llama", tokens=vocab.tokens,
        token_types=vocab.token_types, scores=vocab.scores, bos_id=vocab.bos_id,
        eos_id=vocab.eos_id, unk_id=vocab.unk_id, add_bos=True, add_space_prefix=True,
    )
    return load_tokenizer(path)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def vocabulary(request):
    tokenizer = request.getfixturevalue(request.param)
    return request.param, tokenizer, llg_tokenizer(tokenizer)


def allowed(matcher: GrammarMatcher, vocab_size: int) -> np.ndarray:
    bits = np.zeros((1, bitmask_words(vocab_size)), dtype=np.int32)
    fill_bitmasks([(matcher, 0)], bits)
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def matcher_for(lltok, spec: GrammarSpec) -> GrammarMatcher:
    from llguidance import LLMatcher

    return GrammarMatcher(LLMatcher(lltok, spec.llguidance_grammar(), log_level=0))


def test_every_token_has_its_decoded_bytes_and_controls_are_special(vocabulary):
    kind, tokenizer, lltok = vocabulary
    table = tokenizer.decode_table
    types = tokenizer.vocab.token_types
    assert lltok.vocab_size == tokenizer.vocab_size
    for token_id in range(tokenizer.vocab_size):
        if table.special[token_id]:
            assert lltok.is_special_token(token_id), token_id
        elif table.pieces[token_id][:1] == b"\xff":
            # llguidance's special marker; byte 0xFF is never UTF-8, so no text grammar loses it
            assert kind == "sentencepiece" and table.pieces[token_id] == b"\xff"
        else:
            assert not lltok.is_special_token(token_id), token_id
            assert lltok.decode_bytes([token_id]) == table.pieces[token_id], token_id
    controls = np.flatnonzero(types == TokenType.CONTROL)
    assert len(controls) >= 2 and all(lltok.is_special_token(int(i)) for i in controls)
    if kind == "sentencepiece":  # byte tokens are their byte, "▁" a space
        byte_a = tokenizer.vocab.tokens.index("<0x41>")
        assert lltok.decode_bytes([byte_a]) == b"A"
        piece = next(i for i, t in enumerate(tokenizer.vocab.tokens) if t.startswith("▁") and
                     len(t) > 2)  # fmt: skip
        assert lltok.decode_bytes([piece]) == tokenizer.vocab.tokens[piece].replace("▁", " ").encode()


def test_literal_grammar_allows_our_tokenization_then_only_end_tokens(vocabulary):
    kind, tokenizer, lltok = vocabulary
    ids = tokenizer.encode(TEXT, add_special_tokens=False, parse_special=False)
    if kind == "sentencepiece":  # characters outside the pieces come as <0xNN> byte tokens
        assert any(tokenizer.vocab.tokens[i].startswith("<0x") for i in ids)
    # The text as generated (a SentencePiece encoder's space prefix included)
    literal = b"".join(tokenizer.decode_table.pieces[i] for i in ids).decode()
    grammar = f"start: {json.dumps(literal, ensure_ascii=False)}"
    matcher = matcher_for(lltok, GrammarSpec("grammar", grammar))
    assert matcher.error is None
    special = np.array(tokenizer.decode_table.special)
    end = sorted(tokenizer.end_of_generation_ids)
    for token_id in ids:
        mask = allowed(matcher, tokenizer.vocab_size)
        assert mask[token_id], (token_id, tokenizer.vocab.tokens[token_id])
        assert not (mask & special).any()
        matcher.consume(token_id)
    mask = allowed(matcher, tokenizer.vocab_size)
    assert matcher.accepting and sorted(np.flatnonzero(mask).tolist()) == end


def test_json_grammar_never_allows_control_tokens_and_pads_the_model_vocab(byte_level):
    lltok = llg_tokenizer(byte_level, byte_level.vocab_size + 64)  # logits wider than the vocab
    assert lltok.vocab_size == byte_level.vocab_size + 64
    matcher = matcher_for(lltok, GrammarSpec("json_object", ""))
    special = np.array(byte_level.decode_table.special + [False] * 64)
    for token_id in byte_level.encode('{"key": "<|im_end|>"}', add_special_tokens=False,
                                      parse_special=False):  # fmt: skip
        mask = allowed(matcher, lltok.vocab_size)
        assert mask[token_id] and not (mask & special).any() and not mask[-64:].any()
        matcher.consume(token_id)
    assert matcher.finished


def test_a_rejected_token_is_a_grammar_error(byte_level):
    from structured import GrammarError

    matcher = matcher_for(llg_tokenizer(byte_level), GrammarSpec("regex", "[0-9]+"))
    with pytest.raises(GrammarError, match="rejects token"):
        matcher.consume(byte_level.encode("x", add_special_tokens=False)[0])
    assert matcher.error
