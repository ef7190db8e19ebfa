"""A model's weights on the GPU, still quantised: the GGUF blocks uploaded as uint8 tensors.

Matrices keep the file's bytes, with one exception: Q4_0 and Q8_0 matrices are repacked at
upload (matvec.pack_rows) into per-row "all quants, then all fp16 scales, padded to 16 bytes",
because their 18/34-byte blocks leave the quants only 2-byte aligned and matvec.cu then needs
2-byte loads (well short of the copy bandwidth); repacked, each lane's quants are one aligned
load. Only bytes move, so the values and the kernel's arithmetic are unchanged (tests/gpu/
test_cuda_repack.py checks the round trip); the prefill's fp16 dequantise reads that layout too.
The token-embedding table keeps the GGUF layout (it is only gathered, by embedding.cu); a tied
output matrix gets its own repacked copy.
Q/K/V are fused by concatenating their rows when the parts share a type (a packed row is
self-contained, so a concatenation is a valid matrix in either layout); otherwise they stay
separate parts, each written to its column range of the fused output. Gate/up of one type are
fused with their rows interleaved (gate 0, up 0, gate 1, ...): the matvec's SwiGLU epilogue then
writes silu(gate) * up itself (FusedLinear.swiglu); of two types they stay parts, and the SiLU
kernel runs after them.
A type with no matvec kernel (F32, Q2_K, Q3_K) is dequantised at load and stored as F16.
Norm weights, biases and RoPE factors are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType

from gpu.cuda.embedding import DequantRows
from gpu.cuda.errors import CudaError
from gpu.cuda.matvec import MATVEC_TYPES, MAX_SEQS, MatVec
from gpu.cuda.tcmm import TcWorkspace, TensorCoreMatmul
from loader.config import ModelConfig
from loader.gguf_file import GGUFFile
from loader.quants import dequantize

_T = GGMLQuantizationType
ProgressCallback = Callable[[int, int], None]


@dataclass(slots=True)
class QuantMatrix:
    """One [n_rows, n_cols] matrix as quantised rows on the GPU, with its matvec op.

    `raw` is in the matvec layout (MatVec.pack) when `packed`, else the GGUF bytes as stored
    (the embedding table: DequantRows gathers GGUF rows)."""

    raw: torch.Tensor  # uint8 [n_rows * row_bytes of its layout]
    ggml_type: GGMLQuantizationType
    n_rows: int
    n_cols: int
    matvec: MatVec
    packed: bool = True

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def as_packed(self) -> QuantMatrix:
        """This matrix in the matvec layout: itself, or a repacked copy."""
        if self.packed:
            return self
        raw = self.matvec.pack(self.raw)
        return QuantMatrix(raw, self.ggml_type, self.n_rows, self.n_cols, self.matvec)

    def dense(self) -> torch.Tensor:
        """The matrix as fp16 [n_rows, n_cols] for the prefill GEMM: F16 weights are that
        already (a view of `raw`, no copy: read-only); the others are dequantised into an fp16
        scratch in one pass (values as float32 dequantisation then .half() gives)."""
        if self.ggml_type == _T.F16:
            return self.raw.view(torch.float16).view(self.n_rows, self.n_cols)
        out = torch.empty(self.n_rows, self.n_cols, dtype=torch.float16, device=self.raw.device)
        # Packed Q4_0/Q8_0 are read in their matvec layout: no per-call copy back to GGUF blocks.
        DequantRows(self.ggml_type, self.n_cols, matvec_layout=self.packed).rows(out, self.raw)
        return out


@dataclass(slots=True)
class FusedLinear:
    """Parts written side by side into one output row: [(matrix, first output column)]."""

    parts: list[tuple[QuantMatrix, int]]
    bias: torch.Tensor | None  # float32 [n_out]
    n_out: int
    interleaved: bool = False  # one matrix of (gate, up) row pairs: fuse_swiglu
    tc: list[TensorCoreMatmul] = field(default_factory=list)  # per part: tensor_core()

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m, _ in self.parts)

    def matvec(self, y: torch.Tensor, x: torch.Tensor, residual: bool = False) -> None:
        """y[:, :n_out] = W x (+ bias) (+ y when `residual`), MAX_SEQS rows per launch."""
        for start in range(0, x.shape[0], MAX_SEQS):
            rows = slice(start, start + MAX_SEQS)
            for matrix, col in self.parts:
                out = y[rows, col : col + matrix.n_rows]
                bias = None if self.bias is None else self.bias[col : col + matrix.n_rows]
                matrix.matvec(out, x[rows], matrix.raw, bias=bias,
                              residual=out if residual else None)

    def swiglu(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out[:, :n_out // 2] = silu(gate x) * (up x) through the matvec's epilogue (interleaved
        gate.up only), MAX_SEQS rows per launch."""
        if not self.interleaved:
            raise CudaError("swiglu: this gate.up is not interleaved (parts of two types)")
        matrix = self.parts[0][0]
        for start in range(0, x.shape[0], MAX_SEQS):
            rows = slice(start, start + MAX_SEQS)
            matrix.matvec(out[rows], x[rows], matrix.raw, swiglu=True)

    def tensor_core(self, sm_count: int) -> list[TensorCoreMatmul]:
        """The parts' tensor-core products (built once; the split-K counts depend on sm_count)."""
        if not self.tc:
            self.tc = [TensorCoreMatmul(m.ggml_type, m.n_rows, m.n_cols, sm_count)
                       for m, _ in self.parts]  # fmt: skip
        return self.tc

    def tc_matmul(self, y: torch.Tensor, x16: torch.Tensor, workspace: TcWorkspace,
                  residual: bool = False) -> None:  # fmt: skip
        """y[:, :n_out] = W x16 (+ bias) (+ y when `residual`) on the tensor cores, every row of
        x16 in one launch per part (tensor_core() first)."""
        for (matrix, col), op in zip(self.parts, self.tc, strict=True):
            out = y[:, col : col + matrix.n_rows]
            bias = None if self.bias is None else self.bias[col : col + matrix.n_rows]
            op(out, x16, matrix.raw, workspace, bias=bias, residual=out if residual else None)

    def tc_swiglu(self, out: torch.Tensor, x16: torch.Tensor, workspace: TcWorkspace) -> None:
        """out[:, :n_out // 2] = silu(gate x16) * (up x16) on the tensor cores (interleaved)."""
        if not self.interleaved:
            raise CudaError("swiglu: this gate.up is not interleaved (parts of two types)")
        self.tc[0](out, x16, self.parts[0][0].raw, workspace, swiglu=True)

    def dense(self) -> torch.Tensor:
        """[n_out, n_in] fp16 (prefill path); rows in this linear's order (interleaved ones
        stay interleaved)."""
        if len(self.parts) == 1:
            return self.parts[0][0].dense()
        return torch.cat([m.dense() for m, _ in self.parts])


@dataclass(slots=True)
class QuantLayer:
    attn_norm: torch.Tensor
    qkv: FusedLinear  # Q rows, then K, then V
    wo: FusedLinear
    ffn_norm: torch.Tensor
    gate_up: FusedLinear  # gate rows, then up
    down: FusedLinear


@dataclass(slots=True)
class QuantModel:
    token_embd: QuantMatrix
    output_norm: torch.Tensor
    output: FusedLinear  # when tied: token_embd's bytes, or a repacked copy (Q4_0/Q8_0)
    layers: list[QuantLayer]
    rope_freq_factors: torch.Tensor | None

    def linears(self) -> list[FusedLinear]:
        """Every matrix product of a decode step: the layers' four, then the LM head."""
        out = [lin for lyr in self.layers for lin in (lyr.qkv, lyr.wo, lyr.gate_up, lyr.down)]
        return out + [self.output]

    def matrix_bytes(self) -> int:
        """Bytes of matrices one decode step reads (the embedding table is only indexed)."""
        return self.output.nbytes + sum(
            lyr.qkv.nbytes + lyr.wo.nbytes + lyr.gate_up.nbytes + lyr.down.nbytes
            for lyr in self.layers
        )


class _Uploader:
    def __init__(self, file: GGUFFile, device: torch.device, progress: ProgressCallback | None):
        self.file, self.device, self.progress = file, device, progress
        self.bytes_total = sum(info.nbytes for info in file.tensors.values())
        self.bytes_done = 0

    def _bytes(self, name: str) -> torch.Tensor:
        raw = torch.from_numpy(np.array(self.file.tensor_data(name))).to(self.device)
        self.bytes_done += raw.numel()
        if self.progress is not None:
            self.progress(self.bytes_done, self.bytes_total)
        return raw

    def vector(self, name: str) -> torch.Tensor:
        info = self.file.tensor(name)
        return dequantize(self._bytes(name), info.ggml_type, info.shape).float().reshape(-1)

    def matrix(self, name: str, pack: bool = True) -> QuantMatrix:
        """A matrix on the GPU, in the matvec layout unless `pack` is False (GGUF layout)."""
        info = self.file.tensor(name)
        if len(info.shape) != 2:
            raise CudaError(f"{name}: expected a matrix, got shape {info.shape}")
        n_rows, n_cols = info.shape
        qtype, raw = info.ggml_type, self._bytes(name)
        if qtype not in MATVEC_TYPES:
            values = dequantize(raw, qtype, info.shape)
            qtype, raw = _T.F16, values.half().view(torch.uint8).reshape(-1)
        matvec = MatVec(qtype, n_rows, n_cols)
        if pack:
            raw = matvec.pack(raw)
        return QuantMatrix(raw, qtype, n_rows, n_cols, matvec, packed=pack)


def fuse(matrices: list[QuantMatrix], bias: torch.Tensor | None = None) -> FusedLinear:
    """One matrix when all parts share a type (raw rows concatenated), else parts side by side."""
    if not all(m.packed for m in matrices):
        raise CudaError("fuse: every part must be in the matvec layout (QuantMatrix.as_packed)")
    n_out = sum(m.n_rows for m in matrices)
    first = matrices[0]
    if len(matrices) > 1 and all(m.ggml_type == first.ggml_type for m in matrices):
        raw = torch.cat([m.raw for m in matrices])
        fused = QuantMatrix(raw, first.ggml_type, n_out, first.n_cols,
                            MatVec(first.ggml_type, n_out, first.n_cols))  # fmt: skip
        return FusedLinear([(fused, 0)], bias, n_out)
    parts, col = [], 0
    for m in matrices:
        parts.append((m, col))
        col += m.n_rows
    return FusedLinear(parts, bias, n_out)


def fuse_swiglu(gate: QuantMatrix, up: QuantMatrix) -> FusedLinear:
    """Gate and up of one type as one matrix of interleaved (gate i, up i) rows, for the matvec's
    SwiGLU epilogue; of two types, parts side by side (gate columns, then up)."""
    if gate.ggml_type != up.ggml_type or gate.n_rows != up.n_rows or gate.n_cols != up.n_cols:
        return fuse([gate, up])
    if not (gate.packed and up.packed):
        raise CudaError("fuse_swiglu: both parts must be in the matvec layout")
    pairs = torch.stack([gate.raw.view(gate.n_rows, -1), up.raw.view(up.n_rows, -1)], dim=1)
    n_out = 2 * gate.n_rows
    fused = QuantMatrix(pairs.reshape(-1), gate.ggml_type, n_out, gate.n_cols,
                        MatVec(gate.ggml_type, n_out, gate.n_cols))  # fmt: skip
    return FusedLinear([(fused, 0)], None, n_out, interleaved=True)


def split_rows(matrix: QuantMatrix, n_first: int) -> tuple[QuantMatrix, QuantMatrix]:
    """A packed matrix's first n_first rows and the rest, as two matrices (views of its bytes)."""
    rows = matrix.raw.view(matrix.n_rows, -1)
    parts = []
    for chunk in (rows[:n_first], rows[n_first:]):
        n = chunk.shape[0]
        parts.append(QuantMatrix(chunk.reshape(-1), matrix.ggml_type, n, matrix.n_cols,
                                 MatVec(matrix.ggml_type, n, matrix.n_cols)))  # fmt: skip
    return parts[0], parts[1]


def load_quant_weights(
    file: GGUFFile, config: ModelConfig, device: torch.device,
    progress: ProgressCallback | None = None,
) -> QuantModel:  # fmt: skip
    up = _Uploader(file, device, progress)
    layers = []
    for i in range(config.n_layers):
        blk = f"blk.{i}"
        if config.fused_qkv:
            qkv_parts = [up.matrix(f"{blk}.attn_qkv.weight")]
            bias = up.vector(f"{blk}.attn_qkv.bias") if config.qkv_bias else None
        else:
            qkv_parts = [up.matrix(f"{blk}.attn_{p}.weight") for p in "qkv"]
            bias = None
            if config.qkv_bias:
                bias = torch.cat([up.vector(f"{blk}.attn_{p}.bias") for p in "qkv"])
        if config.fused_gate_up:  # gate rows, then up (weights.py)
            gate, up_rows = split_rows(up.matrix(f"{blk}.ffn_up.weight"), config.ffn_size)
        else:
            gate, up_rows = up.matrix(f"{blk}.ffn_gate.weight"), up.matrix(f"{blk}.ffn_up.weight")
        layers.append(
            QuantLayer(
                attn_norm=up.vector(f"{blk}.attn_norm.weight"),
                qkv=fuse(qkv_parts, bias),
                wo=fuse([up.matrix(f"{blk}.attn_output.weight")]),
                ffn_norm=up.vector(f"{blk}.ffn_norm.weight"),
                gate_up=fuse_swiglu(gate, up_rows),
                down=fuse([up.matrix(f"{blk}.ffn_down.weight")]),
            )
        )
    token_embd = up.matrix("token_embd.weight", pack=False)  # gathered by embedding.cu
    factors = config.rope.freq_factors_tensor
    output = token_embd.as_packed() if config.tied_embeddings else up.matrix("output.weight")
    return QuantModel(
        token_embd=token_embd,
        output_norm=up.vector("output_norm.weight"),
        output=fuse([output]),
        layers=layers,
        rope_freq_factors=up.vector(factors) if factors else None,
    )
