"""Synthetic GGUF models: a real architecture's shapes and tokenizer, random but sane weights.

We cannot ship Llama 3 8B to test the loader, the kernels or the serving path at that size, but
its shapes are what matter there: `write_synthetic_gguf` lays a file out the way llama.cpp writes
the real one (tensor names, dims, metadata keys, tokenizer), and transformers loads it. Quantised
tensors are composed block by block from random bits and random fp16 scales, not quantised from
floats (gguf.quants has no K-quant quantiser, and its others would take an hour for 8B), and they
are generated and written one at a time, so memory stays at about one tensor.

Values: linear weights have std 1/sqrt(fan_in), which preserves variance through each matmul,
so the residual stream only grows as sqrt(depth) (rms about 5 after SmolLM2's 30 layers, logits
std about 1); norms are 1, biases small. A tensor's bytes depend only on the seed, its name, its
type and its dims, so `--layers 1` and the full file share blk.0.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)

from loader.errors import OrcdError
from loader.gguf_file import open_gguf
from loader.registry import DEFAULT_MODEL, resolve_model

_T = GGMLQuantizationType


class SynthError(OrcdError):
    """A synthetic model cannot be written: unknown shape or type, or the output is unwritable."""


@dataclass(slots=True, frozen=True)
class ModelShape:
    """A real model's architecture and sizes: everything a synthetic copy of it must match."""

    name: str
    architecture: str  # general.architecture: llama | qwen2 | phi3
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    tokenizer: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokenizer_pre: str  # tokenizer.ggml.pre: selects llama.cpp's (and transformers') pre-split
    qkv_bias: bool = False  # qwen2: F32 blk.N.attn_{q,k,v}.bias
    fused: bool = False  # phi3: blk.N.attn_qkv and ffn_up holding gate then up; no ffn_gate
    extra_specials: tuple[str, ...] = ()  # CONTROL tokens added to a SentencePiece vocabulary

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def with_layers(self, n_layers: int) -> ModelShape:
        """The same model cut to `n_layers` blocks (for small test files)."""
        if n_layers < 1:
            raise SynthError(f"layer count must be at least 1, got {n_layers}")
        return replace(self, n_layers=n_layers)


SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # name, architecture, layers, hidden, heads, kv heads, ffn, vocab, context, rope base, eps
        ModelShape("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152, 8192, 100000.0, 1e-5,
                   tied_embeddings=True, tokenizer="gpt2", tokenizer_pre="smollm"),
        ModelShape("qwen2-0.5b", "qwen2", 24, 896, 14, 2, 4864, 151936, 32768, 1000000.0, 1e-6,
                   tied_embeddings=True, tokenizer="gpt2", tokenizer_pre="qwen2", qkv_bias=True),
        ModelShape("phi3-mini", "phi3", 32, 3072, 32, 32, 8192, 32064, 4096, 10000.0, 1e-5,
                   tied_embeddings=False, tokenizer="llama", tokenizer_pre="default", fused=True,
                   extra_specials=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                   "<|end|>")),
        ModelShape("tinyllama-1.1b", "llama", 22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5,
                   tied_embeddings=False, tokenizer="llama", tokenizer_pre="default"),
        ModelShape("llama3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5,
                   tied_embeddings=False, tokenizer="gpt2", tokenizer_pre="llama-bpe"),
    )
}  # fmt: skip

# Types a synthetic file can be written in, and the general.file_type llama.cpp records for each
# (a uniform K-quant file is what llama.cpp calls the _S variant).
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    _T.F32: LlamaFileType.ALL_F32,
    _T.F16: LlamaFileType.MOSTLY_F16,
    _T.BF16: LlamaFileType.MOSTLY_BF16,
    _T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    _T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    _T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    _T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    _T.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    _T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    _T.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    _T.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
# llama.cpp's substitute when a row is not a whole number of 256-element super-blocks
# (llama_tensor_get_type in llama-quant.cpp), e.g. every 896-wide row of Qwen2-0.5B.
K_QUANT_FALLBACK = {_T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0}
BIAS_STD = 0.1
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
# Values generated per step: bounds the temporaries. Part of the format of a seed's stream, so
# changing it changes every file's bytes.
_CHUNK_ELEMENTS = 1 << 22


def parse_quant(name: str) -> GGMLQuantizationType:
    """`"q4_k"` -> Q4_K, restricted to the types in `FILE_TYPES`."""
    qtype = _T.__members__.get(name.upper())
    if qtype not in FILE_TYPES:
        raise SynthError(
            f"unsupported quant type {name!r}; supported: {', '.join(t.name for t in FILE_TYPES)}"
        )
    return qtype


def storage_type(requested: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """The type a weight with this row length is stored in: the requested one if whole blocks
    fit, else llama.cpp's fallback (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0), else F16."""
    for qtype in (requested, K_QUANT_FALLBACK.get(requested), _T.F16):
        if qtype is not None and row_length % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    raise AssertionError("F16 fits every row")  # unreachable: F16 blocks are one element


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """One tensor of the file: GGUF dims (innermost first), storage type, what to fill it with."""

    name: str
    dims: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    kind: str  # "weight" (random, std `std`), "norm" (all ones) or "bias" (random F32)
    std: float

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.dims) // block_size * type_size


def plan_tensors(shape: ModelShape, quant: GGMLQuantizationType) -> list[TensorSpec]:
    """Every tensor llama.cpp expects for this shape, with the names and dims it writes."""
    h, ffn, vocab = shape.hidden_size, shape.ffn_size, shape.vocab_size
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim

    def weight(name: str, fan_in: int, fan_out: int) -> TensorSpec:
        qtype = storage_type(quant, fan_in)
        return TensorSpec(name, (fan_in, fan_out), qtype, "weight", 1 / math.sqrt(fan_in))

    def vector(name: str, size: int, kind: str) -> TensorSpec:
        return TensorSpec(name, (size,), _T.F32, kind, BIAS_STD if kind == "bias" else 0.0)

    # token_embd's rows are embeddings of width h; 1/sqrt(h) also keeps tied logits O(1).
    # No output.weight means tied: llama.cpp and transformers both infer it from its absence.
    specs = [weight("token_embd.weight", h, vocab), vector("output_norm.weight", h, "norm")]
    if not shape.tied_embeddings:
        specs.append(weight("output.weight", h, vocab))
    qkv_widths = (("q", q), ("k", kv), ("v", kv))
    for i in range(shape.n_layers):
        blk = f"blk.{i}"
        specs.append(vector(f"{blk}.attn_norm.weight", h, "norm"))
        if shape.fused:
            specs.append(weight(f"{blk}.attn_qkv.weight", h, q + 2 * kv))
        else:
            specs += [weight(f"{blk}.attn_{x}.weight", h, width) for x, width in qkv_widths]
        if shape.qkv_bias:
            specs += [vector(f"{blk}.attn_{x}.bias", width, "bias") for x, width in qkv_widths]
        specs.append(weight(f"{blk}.attn_output.weight", q, h))
        specs.append(vector(f"{blk}.ffn_norm.weight", h, "norm"))
        if shape.fused:
            specs.append(weight(f"{blk}.ffn_up.weight", h, 2 * ffn))
        else:
            specs += [weight(f"{blk}.ffn_{x}.weight", h, ffn) for x in ("gate", "up")]
        specs.append(weight(f"{blk}.ffn_down.weight", ffn, h))
    return specs


# --- random tensor data ------------------------------------------------------------------------
#
# Block layouts are ggml's (ggml-common.h), little-endian. Every quant bit is uniformly random;
# only the scales are chosen: fp16, positive or of random sign like llama.cpp's own, each block's
# scale drawn from base * U(0.5, 1.5) so that a kernel reading the wrong block's scale is caught.
# `base` is std / rms(integer factor): the mean square of each type's integer factor is below,
# for uniform q on n levels its variance (n^2 - 1) / 12, plus the square of any off-centre mean.

_JITTER_MS = 13 / 12  # E[u^2] for u ~ U(0.5, 1.5)
_KSC = (32, 59)  # Q4_K/Q5_K 6-bit sub-block scales; mins are the scale +- 4, still within 6 bits
_Q6SC = (64, 127)  # Q6_K int8 sub-block scale magnitudes


def _mean_square(lo: int, hi: int) -> float:
    """E[k^2] for k uniform on the integers lo..hi."""
    k = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(k * k))


def _block_dtype(*fields: tuple) -> np.dtype:
    return np.dtype([(name, kind, (count,)) if count > 1 else (name, kind)
                     for name, kind, count in fields])  # fmt: skip


_BLOCKS: dict[GGMLQuantizationType, np.dtype] = {
    _T.Q4_0: _block_dtype(("d", "<f2", 1), ("qs", "u1", 16)),
    _T.Q4_1: _block_dtype(("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", 16)),
    _T.Q5_0: _block_dtype(("d", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", 16)),
    _T.Q5_1: _block_dtype(("d", "<f2", 1), ("m", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", 16)),
    _T.Q8_0: _block_dtype(("d", "<f2", 1), ("qs", "i1", 32)),
    _T.Q4_K: _block_dtype(("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12),
                          ("qs", "u1", 128)),
    _T.Q5_K: _block_dtype(("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12),
                          ("qh", "u1", 32), ("qs", "u1", 128)),
    _T.Q6_K: _block_dtype(("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16),
                          ("d", "<f2", 1)),
}  # fmt: skip
# Mean square of the integer factor multiplying d, per type (see the comment above).
_FACTOR_MS: dict[GGMLQuantizationType, float] = {
    _T.Q4_0: _mean_square(-8, 7),  # q - 8
    _T.Q5_0: _mean_square(-16, 15),  # q - 16
    _T.Q8_0: _mean_square(-127, 127),  # llama.cpp never writes -128
    _T.Q4_1: (16**2 - 1) / 12 + 1 / 3,  # q - 7.5 - e, e ~ U(-1, 1) moves the min off-centre
    _T.Q5_1: (32**2 - 1) / 12 + 1 / 3,  # q - 15.5 - e
    # sc * (q - 7.5) - 7.5 * (m - sc), with the min m = sc + j, j uniform on -4..4
    _T.Q4_K: _mean_square(*_KSC) * (16**2 - 1) / 12 + 7.5**2 * _mean_square(-4, 4),
    _T.Q5_K: _mean_square(*_KSC) * (32**2 - 1) / 12 + 15.5**2 * _mean_square(-4, 4),
    _T.Q6_K: _mean_square(*_Q6SC) * _mean_square(-32, 31),  # sc * (q - 32)
}


def _random_scales(rng: np.random.Generator, n: int, base: float, signed: bool) -> np.ndarray:
    scales = base * (rng.random(n, dtype=np.float32) + np.float32(0.5))
    if signed:
        scales = np.where(rng.integers(0, 2, n, dtype=np.uint8) == 1, -scales, scales)
    return scales


def _bits(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (n, width), dtype=np.uint8)


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into Q4_K/Q5_K's 12 bytes (get_scale_min_k4 in reverse):
    bytes 0-3 scales 0-3 (low 6 bits) with the top 2 bits of scales 4-7, bytes 4-7 the same for
    mins, bytes 8-11 the low nibbles of scales 4-7 and, above them, of mins 4-7."""
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mins[:, 4:] & 0xF) << 4)
    return packed


def random_blocks(
    qtype: GGMLQuantizationType, n_blocks: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    """`n_blocks` valid random blocks of a quantised type whose values have std about `std` and
    mean about 0, as a (n_blocks, type_size) uint8 array."""
    blocks = np.empty(n_blocks, dtype=_BLOCKS[qtype])
    base = std / math.sqrt(_FACTOR_MS[qtype] * _JITTER_MS)
    if qtype == _T.Q8_0:
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=True)
        blocks["qs"] = rng.integers(-127, 128, (n_blocks, 32), dtype=np.int8)
    elif qtype in (_T.Q4_0, _T.Q5_0):
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=True)
    elif qtype in (_T.Q4_1, _T.Q5_1):
        d = _random_scales(rng, n_blocks, base, signed=False)
        centre = 7.5 if qtype == _T.Q4_1 else 15.5
        blocks["d"] = d
        blocks["m"] = -d * (centre + 2 * rng.random(n_blocks, dtype=np.float32) - 1)
    elif qtype in (_T.Q4_K, _T.Q5_K):
        d = _random_scales(rng, n_blocks, base, signed=False)
        sc = rng.integers(_KSC[0], _KSC[1] + 1, (n_blocks, 8), dtype=np.uint8)
        mins = (sc + rng.integers(-4, 5, (n_blocks, 8), dtype=np.int8)).astype(np.uint8)
        blocks["d"] = d
        blocks["dmin"] = d * (7.5 if qtype == _T.Q4_K else 15.5)
        blocks["scales"] = _pack_k_scales(sc, mins)
    elif qtype == _T.Q6_K:
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=False)
        magnitude = rng.integers(_Q6SC[0], _Q6SC[1] + 1, (n_blocks, 16), dtype=np.int8)
        negative = rng.integers(0, 2, (n_blocks, 16), dtype=np.uint8) == 1
        blocks["scales"] = np.where(negative, -magnitude, magnitude)
    for field in ("ql", "qh", "qs"):  # the quant bits proper, all uniformly random
        if field in blocks.dtype.names and blocks.dtype[field].base == np.uint8:
            blocks[field] = _bits(rng, n_blocks, blocks.dtype[field].shape[0])
    return blocks.view(np.uint8).reshape(n_blocks, -1)


def _random_floats(
    qtype: GGMLQuantizationType, n: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
    if qtype == _T.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype == _T.BF16:  # round to nearest even on the upper 16 bits (values are finite)
        bits = values.view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    return values.view(np.uint8)


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for one tensor: keyed by name, so no tensor depends on the others."""
    entropy = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
    return np.random.Generator(np.random.PCG64(entropy))


def random_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """A tensor's bytes, generated in fixed-size chunks of whole rows into one buffer."""
    if spec.kind == "norm":
        return np.ones(spec.dims, dtype=np.float32).view(np.uint8).reshape(-1)
    rng = tensor_rng(seed, spec.name)
    row_length, n_rows = spec.dims[0], math.prod(spec.dims[1:])
    block_size, type_size = GGML_QUANT_SIZES[spec.ggml_type]
    out = np.empty((n_rows, row_length // block_size * type_size), dtype=np.uint8)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row_length)
    for start in range(0, n_rows, rows_per_chunk):
        rows = out[start : start + rows_per_chunk]
        n = rows.shape[0] * row_length
        if spec.ggml_type in _BLOCKS:
            chunk = random_blocks(spec.ggml_type, n // block_size, spec.std, rng)
        else:
            chunk = _random_floats(spec.ggml_type, n, spec.std, rng)
        rows[...] = chunk.reshape(rows.shape)
    return out.reshape(-1)


# --- tokenizer ---------------------------------------------------------------------------------


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


# --- the file ----------------------------------------------------------------------------------


def _add_metadata(writer: GGUFWriter, shape: ModelShape, quant: GGMLQuantizationType) -> None:
    """llama.cpp's keys, written through gguf's helpers so their names and value types match."""
    # transformers loads a llama file whose general.name contains "mistral" as Mistral: ours never.
    writer.add_name(f"orcd synthetic {shape.name}")
    writer.add_file_type(int(FILE_TYPES[quant]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_feed_forward_length(shape.ffn_size)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_base)
    # transformers reads llama's rope.dimension_count as head_dim, so it must be the full head.
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)
    vocab = build_vocabulary(shape)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(shape.tokenizer_pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.token_types])
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_synthetic_gguf(
    path: str | os.PathLike,
    shape: ModelShape,
    quant: GGMLQuantizationType,
    *,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
) -> list[TensorSpec]:
    """Write a synthetic model to `path` and return its tensors; `progress(nbytes)` is called
    after each one. The file appears under its name only once complete."""
    if quant not in FILE_TYPES:
        raise SynthError(f"unsupported quant type {quant.name}")
    if seed < 0:
        raise SynthError(f"seed must be non-negative, got {seed}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    specs = plan_tensors(shape, quant)
    writer = GGUFWriter(partial, shape.architecture)
    _add_metadata(writer, shape, quant)
    for spec in specs:
        # gguf takes a quantised tensor's torch shape in bytes (uint8) and converts it to elements
        byte_shape = (*reversed(spec.dims[1:]), spec.nbytes // math.prod(spec.dims[1:]))
        writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes,
                               raw_dtype=spec.ggml_type)  # fmt: skip
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec in specs:
            writer.write_tensor_data(random_tensor(spec, seed))
            if progress is not None:
                progress(spec.nbytes)
        writer.close()
        os.replace(partial, path)
    except OSError as exc:
        writer.close()
        partial.unlink(missing_ok=True)
        raise SynthError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return specs
