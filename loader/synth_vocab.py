"""The tokenizer of a synthetic GGUF: the default model's vocabulary, cut, padded or respelled.

A synthetic file needs a tokenizer that transformers loads, at the real model's exact vocabulary
size and kind (byte-level BPE or SentencePiece); we build it from the default model's vocabulary
rather than from each real model's.

That vocabulary ships with orcd (VOCAB_FILE: SmolLM2-135M-Instruct's tokenizer.* metadata in a
GGUF without tensors, gzipped), so `orcd synth` needs no model file. `python -m
loader.synth_vocab` (`write_vocabulary_file`) writes it from the default model, to the same bytes
each time; a test checks that it matches the model wherever the model is installed.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from gguf import GGUFValueType, GGUFWriter, TokenType

from loader.gguf_file import open_gguf
from loader.metadata import Metadata
from loader.synth_specs import ModelShape, SynthError

# Package data of `loader` (pyproject [tool.setuptools.package-data]).
VOCAB_FILE = "data/smollm2-135m-vocab.gguf.gz"
# Copied from the model besides every tokenizer.* key.
_GENERAL_KEYS = ("general.name", "general.license")

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


def vocabulary_from_metadata(meta: Metadata) -> Vocabulary:
    """A byte-level BPE vocabulary with ChatML specials, as a GGUF's metadata holds it."""
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


def vocabulary_file() -> Path:
    """The shipped vocabulary file (gzipped GGUF)."""
    return Path(str(resources.files("loader").joinpath(VOCAB_FILE)))


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The default model's byte-level BPE vocabulary (SmolLM2: 49152 tokens, ChatML specials),
    read from the shipped VOCAB_FILE."""
    data = gzip.decompress(vocabulary_file().read_bytes())
    # open_gguf maps a file: the decompressed bytes go to a temporary one for the parse.
    with tempfile.TemporaryDirectory(prefix="orcd-vocab-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        path.write_bytes(data)
        with open_gguf(path) as gguf:
            return vocabulary_from_metadata(gguf.metadata)


def write_vocabulary_file(model: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write `model`'s tokenizer.* metadata (tokens, merges, token types, special ids,
    pre-tokenizer, chat template, flags), its name and license, as a gzipped GGUF without
    tensors; returns the bytes written. The same model gives the same bytes."""
    with open_gguf(model) as gguf:
        meta = gguf.metadata
        keys = [k for k in meta if k.startswith("tokenizer.") or k in _GENERAL_KEYS]
        with tempfile.TemporaryDirectory(prefix="orcd-vocab-") as tmp:
            plain = Path(tmp) / "vocab.gguf"
            writer = GGUFWriter(plain, meta.get_str("general.architecture"))
            for key in keys:
                value_type, value = meta.value_type(key), meta.raw(key)
                if isinstance(value_type, tuple):  # (ARRAY, element type)
                    items = value.tolist() if hasattr(value, "tolist") else list(value)
                    writer.add_key_value(key, items, GGUFValueType.ARRAY, value_type[1])
                else:
                    writer.add_key_value(key, value, value_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            data = gzip.compress(plain.read_bytes(), compresslevel=9, mtime=0)
    Path(out).write_bytes(data)
    return len(data)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m loader.synth_vocab [MODEL] [--out PATH]`: rewrite the shipped vocabulary."""
    from loader.registry import DEFAULT_MODEL, resolve_model

    parser = argparse.ArgumentParser(prog="python -m loader.synth_vocab", description=main.__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"a .gguf path or a model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--out", default=str(vocabulary_file()),
                        help="where to write (default: the shipped file, %(default)s)")
    args = parser.parse_args(argv)
    nbytes = write_vocabulary_file(resolve_model(args.model), args.out)
    print(f"wrote {args.out}: {nbytes} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
