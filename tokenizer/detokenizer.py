"""Token ids back to text, all at once or one id at a time, with the same result either way.

Every token is turned into its bytes once, up front (`DecodeTable`). Decoding joins bytes and
runs UTF-8; streaming feeds the same bytes to Python's incremental UTF-8 decoder, which holds
back an incomplete character until its last byte arrives. So a character split over several
tokens (SentencePiece `<0xNN>` byte tokens, byte-level pieces of a multi-byte character) is
emitted once, whole, and each step costs only the new token's bytes, never a re-decode.

Added tokens (control, unknown, user-defined) cut the text into segments. With a SentencePiece
space prefix, the encoder put a "▁" at the start of every segment; decoding drops it again from
a segment's first token when that token starts with "▁" (SentencePiece's own rule: a leading
<0x20> byte token stays), so `decode(encode(text)) == text` also around added tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass

from gguf import TokenType

from tokenizer.build import ADDED_TYPES, SPECIAL_TYPES, SPIECE_UNDERLINE, byte_to_char
from tokenizer.errors import TokenizerError
from tokenizer.vocab import BYTE_LEVEL, GGUFVocab

# Marks a byte-level token that uses a character outside the byte alphabet: such a token is
# decoded from its UTF-8 text, as the `tokenizers` ByteLevel decoder does.
_NOT_A_BYTE = "\U0010ffff"
# Invalid UTF-8 (a model can emit any bytes) becomes U+FFFD. Byte-level text follows Rust's
# from_utf8_lossy, as `tokenizers` and transformers decode it: one U+FFFD per maximal invalid
# sequence, which is Python's "replace". SentencePiece writes one U+FFFD per invalid byte.
BYTE_LEVEL_ERRORS = "replace"
SENTENCEPIECE_ERRORS = "orcd.replace_each_byte"
codecs.register_error(
    SENTENCEPIECE_ERRORS, lambda error: ("\ufffd" * (error.end - error.start), error.end)
)


@dataclass(slots=True, frozen=True)
class DecodeTable:
    """Per token id: its bytes, whether it is an added token, whether it is special."""

    pieces: list[bytes]
    first_pieces: list[bytes]  # the bytes of a token that starts a segment (prefix dropped)
    added: list[bool]  # control, unknown, user-defined: segment boundaries, written as is
    special: list[bool]  # control and unknown: left out when skipping special tokens
    errors: str  # the UTF-8 error handler: BYTE_LEVEL_ERRORS or SENTENCEPIECE_ERRORS

    @classmethod
    def from_vocab(cls, vocab: GGUFVocab) -> DecodeTable:
        types = vocab.token_types.tolist()
        byte_level = vocab.model == BYTE_LEVEL
        if byte_level:
            pieces = _byte_level_pieces(vocab.tokens, types)
        else:
            pieces = _sentencepiece_pieces(vocab.tokens, types)
        first_pieces = pieces
        if not byte_level and vocab.add_space_prefix:
            first_pieces = [
                piece[1:] if kind == TokenType.NORMAL and token[:1] == SPIECE_UNDERLINE else piece
                for token, kind, piece in zip(vocab.tokens, types, pieces, strict=True)
            ]
        return cls(
            pieces=pieces,
            first_pieces=first_pieces,
            added=[t in ADDED_TYPES for t in types],
            special=[t in SPECIAL_TYPES for t in types],
            errors=BYTE_LEVEL_ERRORS if byte_level else SENTENCEPIECE_ERRORS,
        )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD (see `errors`)."""
        parts: list[str] = []
        segment: list[bytes] = []
        for token_id in ids:
            self._check(token_id)
            if not self.added[token_id]:
                segment.append((self.pieces if segment else self.first_pieces)[token_id])
                continue
            parts.append(self._segment_text(segment))
            segment = []
            if not (skip_special_tokens and self.special[token_id]):
                parts.append(self.pieces[token_id].decode("utf-8", self.errors))
        parts.append(self._segment_text(segment))
        return "".join(parts)

    def _segment_text(self, segment: list[bytes]) -> str:
        return b"".join(segment).decode("utf-8", self.errors)

    def _check(self, token_id: int) -> None:
        if not 0 <= token_id < len(self.pieces):
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (0..{len(self.pieces) - 1})"
            )


class StreamingDetokenizer:
    """Fed one token id at a time, returns the text that became complete with it.

    `"".join(push(i) for i in ids) + finish() == decode(ids)`: `finish` flushes bytes of a
    character that never completed (as U+FFFD), exactly as a full decode would show them.
    """

    __slots__ = ("_table", "_skip_special", "_utf8", "_segment_start")

    def __init__(self, table: DecodeTable, skip_special_tokens: bool = True) -> None:
        self._table = table
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(table.errors)
        self._segment_start = True  # the next token is the first of a segment

    def push(self, token_id: int) -> str:
        """Text completed by `token_id` (often "", while a character is still incomplete)."""
        table = self._table
        table._check(token_id)
        if table.added[token_id]:
            text = self._end_segment()
            if not (self._skip_special and table.special[token_id]):
                text += table.pieces[token_id].decode("utf-8", table.errors)
            return text
        pieces = table.first_pieces if self._segment_start else table.pieces
        self._segment_start = False
        return self._utf8.decode(pieces[token_id])

    def finish(self) -> str:
        """Whatever is still held back at the end of the sequence (U+FFFD for broken bytes)."""
        return self._end_segment()

    def _end_segment(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._segment_start = True
        return text


def _byte_level_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    # str.translate maps each alphabet character to the character whose code is its byte, and
    # every other Latin-1 character to a marker that makes the latin-1 encode fail.
    table = {ord(char): byte for byte, char in byte_to_char().items()}
    table.update({code: _NOT_A_BYTE for code in range(256) if code not in table})
    pieces = []
    for token, kind in zip(tokens, types, strict=True):
        if kind in ADDED_TYPES:
            pieces.append(token.encode("utf-8"))  # llama.cpp writes added tokens as plain text
            continue
        try:
            pieces.append(token.translate(table).encode("latin-1"))
        except UnicodeEncodeError:
            pieces.append(token.encode("utf-8"))
    return pieces


def _sentencepiece_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    pieces = []
    for token, kind in zip(tokens, types, strict=True):
        if kind == TokenType.BYTE:
            pieces.append(bytes([_byte_token_value(token)]))
        elif kind in ADDED_TYPES:
            pieces.append(token.encode("utf-8"))
        else:
            pieces.append(token.replace(SPIECE_UNDERLINE, " ").encode("utf-8"))
    return pieces


def _byte_token_value(token: str) -> int:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            pass
    raise TokenizerError(f"BYTE token {token!r} is not of the form <0xNN>")
