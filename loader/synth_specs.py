"""What a synthetic model is made of: the real models' shapes and the tensor specs of a file.

The leaf of the `loader.synth*` modules: `loader.synth` (the file), `loader.synth_blocks` (tensor
data) and `loader.synth_vocab` (the tokenizer) all import from here, and this module imports
none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from jobs.errors import OrcdError


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
