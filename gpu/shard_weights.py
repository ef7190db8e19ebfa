"""One tensor-parallel rank's weights, read from the GGUF's memory map without a full copy.

Column-parallel weights (QKV, gate·up, the vocabulary rows of the embedding and LM head) are
whole rows of the file's [out, in] matrices: a rank copies only its rows' quantised bytes and
dequantises them. Row-parallel weights (O, down) need input columns: when the column span falls
on quant-block boundaries (every real shape at Q8_0 / Q4_0, the 256-wide K-quants when the
share is a multiple of 256) each row's bytes for those blocks are copied; otherwise the matrix
is dequantised whole and cut, one tensor at a time. Norms are small and replicated.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from gpu.int8_linear import Int8Weight
from gpu.tensor_parallel import ShardPlan, Span
from gpu.weights import LayerWeights, ModelWeights
from loader.config import ModelConfig
from loader.gguf_file import GGUFFile
from loader.quants import dequantize


class _ShardReader:
    """Dequantises a rank's rows or columns of named tensors into float32 on the CPU."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file

    def _rows(self, name: str) -> tuple[np.ndarray, tuple[int, ...], int]:
        """The tensor's bytes as [rows, bytes per row] (a view of the map), its shape, its
        quant block length."""
        info = self.file.tensor(name)
        shape = info.shape
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = self.file.tensor_data(name).reshape(n_rows, shape[-1] // block_size * type_size)
        return raw, shape, block_size

    def _decode(self, name: str, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        # Copies only the selected bytes out of the read-only map (torch wants writable memory).
        data = torch.from_numpy(np.array(raw, copy=True).reshape(-1))
        return dequantize(data, self.file.tensor(name).ggml_type, shape)

    def whole(self, name: str) -> torch.Tensor:
        raw, shape, _ = self._rows(name)
        return self._decode(name, raw, shape)

    def rows(self, name: str, spans: tuple[Span, ...] | list[Span]) -> torch.Tensor:
        """Rows `spans` (concatenated) of a [out, in] matrix, or elements of a 1-D vector."""
        raw, shape, _ = self._rows(name)
        if len(shape) == 1:
            vector = self._decode(name, raw, shape)
            return torch.cat([vector[s.start : s.stop] for s in spans])
        picked = np.concatenate([raw[s.start : s.stop] for s in spans])
        return self._decode(name, picked, (sum(s.size for s in spans), shape[1]))

    def columns(self, name: str, span: Span) -> torch.Tensor:
        """Input columns `span` of a [out, in] matrix."""
        raw, shape, block_size = self._rows(name)
        if span.start % block_size or span.stop % block_size:
            return self._decode(name, raw, shape)[:, span.start : span.stop].contiguous()
        bytes_per_block = raw.shape[1] // (shape[1] // block_size)
        cut = raw[:, span.start // block_size * bytes_per_block : span.stop // block_size
                  * bytes_per_block]  # fmt: skip
        return self._decode(name, cut, (shape[0], span.size))


def load_shard_weights(
    file: GGUFFile, config: ModelConfig, plan: ShardPlan, dtype: torch.dtype = torch.float32
) -> ModelWeights:
    """Rank `plan.rank`'s weights in `dtype` on the CPU (`torch.int8`: `Int8Weight` matrices and
    a bfloat16 embedding, as `gpu.weights.load_weights` does), fused like the whole model's:
    `wqkv` holds the rank's Q rows, then K, then V; `w_gate_up` its gate rows, then up."""
    reader = _ShardReader(file)
    int8 = dtype == torch.int8
    dense_dtype = torch.bfloat16 if int8 else dtype

    def packed(weight: torch.Tensor) -> torch.Tensor | Int8Weight:
        weight = weight.to(dense_dtype)
        return Int8Weight.quantize(weight) if int8 else weight

    q_rows, k_rows, v_rows = plan.qkv_rows()
    kv_rows = plan.kv_heads.scaled(plan.head_dim)  # K's (and V's) rows in their own tensors
    gate_rows, up_rows = plan.gate_up_rows()
    layers = []
    for i in range(config.n_layers):
        blk = f"blk.{i}"
        bqkv = None
        if config.fused_qkv:
            wqkv = reader.rows(f"{blk}.attn_qkv.weight", [q_rows, k_rows, v_rows])
            if config.qkv_bias:
                bqkv = reader.rows(f"{blk}.attn_qkv.bias", [q_rows, k_rows, v_rows])
        else:
            parts = {"q": q_rows, "k": kv_rows, "v": kv_rows}
            wqkv = torch.cat([reader.rows(f"{blk}.attn_{p}.weight", [s]) for p, s in parts.items()])
            if config.qkv_bias:
                bqkv = torch.cat([reader.rows(f"{blk}.attn_{p}.bias", [s]) for p, s in parts.items()])
        if config.fused_gate_up:
            w_gate_up = reader.rows(f"{blk}.ffn_up.weight", [gate_rows, up_rows])
        else:
            w_gate_up = torch.cat([reader.rows(f"{blk}.ffn_gate.weight", [gate_rows]),
                                   reader.rows(f"{blk}.ffn_up.weight", [gate_rows])])
        layers.append(
            LayerWeights(
                attn_norm=reader.whole(f"{blk}.attn_norm.weight"),
                wqkv=packed(wqkv),
                bqkv=None if bqkv is None else bqkv.to(dense_dtype),
                wo=packed(reader.columns(f"{blk}.attn_output.weight", plan.o_columns())),
                ffn_norm=reader.whole(f"{blk}.ffn_norm.weight"),
                w_gate_up=packed(w_gate_up),
                w_down=packed(reader.columns(f"{blk}.ffn_down.weight", plan.down_columns())),
            )
        )
    token_embd = reader.rows("token_embd.weight", [plan.vocab]).to(dense_dtype)
    output = token_embd if config.tied_embeddings else reader.rows("output.weight", [plan.vocab])
    factors = config.rope.freq_factors_tensor
    return ModelWeights(
        token_embd=token_embd,
        output_norm=reader.whole("output_norm.weight"),
        output=packed(output),
        layers=layers,
        rope_freq_factors=reader.whole(factors) if factors else None,
    )
