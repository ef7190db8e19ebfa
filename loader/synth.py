"""Synthetic GGUF models: a real architecture's shapes and tokenizer, random but sane weights.

We cannot ship Llama 3 8B to test the loader, the kernels or the serving path at that size, but
its shapes are what matter there: `write_synthetic_gguf` lays a file out the way llama.cpp writes
the real one (tensor names, dims, metadata keys, tokenizer), and transformers loads it. Tensor
data comes from `loader.synth_blocks` and the vocabulary from `loader.synth_vocab`, the shapes
and tensor specs from `loader.synth_specs` (re-exported here); tensors are generated and written
one at a time, so memory stays at about one tensor.

Values: linear weights have std 1/sqrt(fan_in), which preserves variance through each matmul,
so the residual stream only grows as sqrt(depth) (rms about 5 after SmolLM2's 30 layers, logits
std about 1); norms are 1, biases small. A tensor's bytes depend only on the seed, its name, its
type and its dims, so `--layers 1` and the full file share blk.0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
)

from loader.synth_blocks import random_tensor

# The shapes, specs and error are synth_specs's, and this module's public names too.
from loader.synth_specs import SHAPES, ModelShape, SynthError, TensorSpec  # noqa: F401
from loader.synth_vocab import CHATML_TEMPLATE, build_vocabulary

_T = GGMLQuantizationType

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
