"""The tokenizer of a synthetic GGUF: the default model's vocabulary, cut, padded or respelled.

A synthetic file needs a tokenizer that transformers loads, at the real model's exact vocabulary
size and kind (byte-level BPE or SentencePiece); we build it from the default model's vocabulary
rather than from each real model's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from gguf import TokenType

from loader.gguf_file import open_gguf
from loader.registry import DEFAULT_MODEL, resolve_model
from loader.synth_specs import ModelShape, SynthError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")


@dataclass(slots=True, frozen=True)
class Vocabulary:
    """The tokenizer.ggml.* contents of a file."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # byte-level BPE only
    scores: list[float]  # SentencePiece only
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    eot_id: int  # end of a chat turn: <|im_end|>
    add_bos: bool
    add_space_prefix: bool


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The default model's byte-level BPE vocabulary (SmolLM2: 49152 tokens, ChatML specials)."""
    with open_gguf(resolve_model(DEFAULT_MODEL)) as gguf:
        meta = gguf.metadata
        tokens = list(meta.get_str_list("tokenizer.ggml.tokens"))
        return Vocabulary(
            model=meta.get_str("tokenizer.ggml.model"),
            tokens=tokens,
            token_types=[int(t) for t in meta.get_int_array("tokenizer.ggml.token_type")],
            merges=list(meta.get_str_list("tokenizer.ggml.merges")),
            scores=[],
            bos_id=meta.get_int("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get_int("tokenizer.ggml.eos_token_id"),
            unk_id=meta.get_int("tokenizer.ggml.unknown_token_id"),
            pad_id=meta.get_int("tokenizer.ggml.padding_token_id"),
            eot_id=tokens.index("<|im_end|>"),
            add_bos=meta.get_bool("tokenizer.ggml.add_bos_token", False),
            add_space_prefix=False,
        )


def _fillers(start: int, stop: int, taken: set[str]) -> list[str]:
    """Placeholder tokens for ids start..stop-1; no BPE merge or SentencePiece piece spells them."""
    fillers = [f"<|filler_{i}|>" for i in range(start, stop)]
    if taken.intersection(fillers):
        raise SynthError("the source vocabulary already holds a <|filler_N|> token")
    return fillers


def byte_level_vocabulary(source: Vocabulary, size: int) -> Vocabulary:
    """`source` cut or padded to `size` tokens. Cutting drops every merge whose parts or result
    are gone; padding adds UNUSED fillers (UNUSED, not CONTROL: transformers turns each CONTROL
    token into an added special token, and 100k of them make loading slow)."""
    specials = (source.bos_id, source.eos_id, source.unk_id, source.pad_id, source.eot_id)
    if max(specials) >= size:
        raise SynthError(f"vocabulary size {size} leaves no room for the special token ids")
    tokens = source.tokens[:size]
    kept = set(tokens)
    merges = [
        merge
        for merge in source.merges
        if merge.replace(" ", "") in kept and all(part in kept for part in merge.split(" "))
    ]
    fillers = _fillers(len(tokens), size, kept)
    return replace(
        source,
        tokens=tokens + fillers,
        token_types=source.token_types[:size] + [TokenType.UNUSED] * len(fillers),
        merges=merges,
    )


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (printable bytes stand for themselves, the
    rest are shifted to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    shifted = [b for b in range(256) if b not in printable]
    decoder = {chr(b): b for b in printable}
    decoder.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return decoder


def _sentencepiece_pieces(source: Vocabulary, taken: set[str]) -> list[str]:
    """The source's NORMAL tokens respelled as SentencePiece pieces ('Ġ' -> '▁'), in order,
    keeping only those that decode to printable text (a piece cannot hold half a character)."""
    decoder, pieces, seen = _byte_decoder(), [], set(taken)
    for token, token_type in zip(source.tokens, source.token_types, strict=True):
        if token_type != TokenType.NORMAL or any(ch not in decoder for ch in token):
            continue
        try:
            text = bytes(decoder[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        piece = text.replace(" ", "▁")
        if text.isprintable() and piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return pieces


def sentencepiece_vocabulary(
    source: Vocabulary, size: int, specials: tuple[str, ...] = ()
) -> Vocabulary:
    """A llama-style SentencePiece vocabulary of `size`: <unk> <s> </s>, the 256 byte tokens,
    pieces from `source` with descending scores, fillers if short, then ChatML and `specials`.

    transformers builds a byte-fallback BPE from it (phi3 gets its own normalizer), which needs
    the <0xXX> tokens, and treats every CONTROL token as an added special token."""
    head = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tail = list(dict.fromkeys(CHATML_SPECIALS + specials))
    n_pieces = size - len(head) - len(tail)
    if n_pieces < 0:
        raise SynthError(f"vocabulary size {size} is too small for a SentencePiece vocabulary")
    pieces = _sentencepiece_pieces(source, set(head + tail))[:n_pieces]
    fillers = _fillers(len(head) + len(pieces), size - len(tail), set(pieces))
    tokens = head + pieces + fillers + tail
    return Vocabulary(
        model="llama",
        tokens=tokens,
        token_types=[TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
        + [TokenType.BYTE] * 256
        + [TokenType.NORMAL] * len(pieces)
        + [TokenType.UNUSED] * len(fillers)
        + [TokenType.CONTROL] * len(tail),
        merges=[],
        # transformers rebuilds the merges from these scores (the file has none): best first
        scores=[0.0] * len(head)
        + [-float(i + 1) for i in range(len(pieces) + len(fillers))]
        + [0.0] * len(tail),
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=0,
        eot_id=tokens.index("<|im_end|>"),
        add_bos=True,
        add_space_prefix=True,
    )


def build_vocabulary(shape: ModelShape) -> Vocabulary:
    """The vocabulary a synthetic `shape` gets: exactly `shape.vocab_size` tokens."""
    if shape.tokenizer == "gpt2":
        return byte_level_vocabulary(default_vocabulary(), shape.vocab_size)
    return sentencepiece_vocabulary(default_vocabulary(), shape.vocab_size, shape.extra_specials)
