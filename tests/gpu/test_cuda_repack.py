"""The Q4_0/Q8_0 matvec layout (gpu/cuda/matvec.pack_rows) on the CPU: it only moves bytes, so
unpacking gives back the GGUF bytes exactly; every row's quants start 16-byte aligned; and a
packed row is self-contained, so packing fused rows equals fusing packed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gpu.cuda.errors import CudaError
from gpu.cuda.matvec import (
    PACKED_QUANT_BYTES,
    PACKED_ROW_ALIGN,
    MatVec,
    grouped,
    pack_rows,
    packed_row_bytes,
    unpack_rows,
)
from loader.synth_blocks import random_blocks

_T = GGMLQuantizationType
PACKED = sorted(PACKED_QUANT_BYTES, key=int)


def gguf_rows(qtype: _T, n_rows: int, n_cols: int, seed: int = 0) -> torch.Tensor:
    block_elems = GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng([int(qtype), n_rows, n_cols, seed])
    blocks = random_blocks(qtype, n_rows * n_cols // block_elems, 0.05, rng)
    return torch.from_numpy(blocks.reshape(-1).copy())


@pytest.mark.parametrize("n_cols", [32, 96, 256, 4096, 14336])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_pack_round_trip_is_exact(qtype, n_cols):
    n_rows = 7
    raw = gguf_rows(qtype, n_rows, n_cols)
    packed = pack_rows(raw, qtype, n_cols)
    assert packed.dtype == torch.uint8
    assert packed.numel() == n_rows * packed_row_bytes(qtype, n_cols)
    assert torch.equal(unpack_rows(packed, qtype, n_cols), raw)


@pytest.mark.parametrize("n_cols", [96, 512])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_layout_is_quants_then_scales(qtype, n_cols):
    """Against a byte-by-byte construction: row r = quants of each block, scales, zero pad;
    Q4_0 at 512 columns (a multiple of 128) has its quants in 4-block groups, lane-major: slice j
    (bytes 4j..4j+3) of block b at 64 * (b // 4) + 16 * j + 4 * (b % 4)."""
    n_rows, quant_bytes = 5, PACKED_QUANT_BYTES[qtype]
    block_bytes, n_blocks = quant_bytes + 2, n_cols // 32
    raw = gguf_rows(qtype, n_rows, n_cols, seed=1).numpy()
    stride = packed_row_bytes(qtype, n_cols)
    assert stride % PACKED_ROW_ALIGN == 0
    assert 0 <= stride - n_blocks * block_bytes < PACKED_ROW_ALIGN
    packed = pack_rows(torch.from_numpy(raw), qtype, n_cols).numpy().reshape(n_rows, stride)
    for r in range(n_rows):
        for b in range(n_blocks):
            block = raw[(r * n_blocks + b) * block_bytes :][:block_bytes]
            for j in range(quant_bytes // 4):
                at = b * quant_bytes + 4 * j
                if grouped(qtype, n_cols):
                    at = 64 * (b // 4) + 16 * j + 4 * (b % 4)
                assert bytes(packed[r, at : at + 4]) == bytes(block[2 + 4 * j : 6 + 4 * j])
            scale_at = n_blocks * quant_bytes + 2 * b
            assert bytes(packed[r, scale_at : scale_at + 2]) == bytes(block[:2])
        assert not packed[r, n_blocks * block_bytes :].any()


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_rows_concatenate(qtype):
    """Fusing (QKV, gate/up) concatenates packed matrices: same bytes as packing the fused rows."""
    n_cols = 96  # padded rows
    a, b = gguf_rows(qtype, 3, n_cols, seed=2), gguf_rows(qtype, 4, n_cols, seed=3)
    fused = pack_rows(torch.cat([a, b]), qtype, n_cols)
    assert torch.equal(fused, torch.cat([pack_rows(a, qtype, n_cols), pack_rows(b, qtype, n_cols)]))


@pytest.mark.parametrize(
    "qtype", [_T.Q4_1, _T.Q5_0, _T.Q4_K, _T.Q6_K, _T.F16], ids=lambda t: t.name
)
def test_other_types_are_read_in_place(qtype):
    n_cols = 512
    raw = torch.arange(3 * n_cols * 4, dtype=torch.int64).to(torch.uint8)  # any bytes
    op = MatVec(qtype, 3, n_cols)
    assert op.pack(raw) is raw
    assert unpack_rows(raw, qtype, n_cols) is raw
    assert op.row_bytes == packed_row_bytes(qtype, n_cols)


def test_pack_rejects_partial_rows():
    with pytest.raises(CudaError, match="not whole rows"):
        pack_rows(torch.zeros(18 * 3 + 1, dtype=torch.uint8), _T.Q4_0, 32)
    with pytest.raises(CudaError, match="not whole rows"):
        unpack_rows(torch.zeros(40, dtype=torch.uint8), _T.Q4_0, 64)


# --- gate/up interleaved for the matvec's SwiGLU epilogue (gpu/cuda/qweights.py) -----------------

from gpu.cuda.qweights import QuantMatrix, fuse_swiglu, split_rows  # noqa: E402


def _matrix(qtype: _T, n_rows: int, n_cols: int, seed: int) -> QuantMatrix:
    op = MatVec(qtype, n_rows, n_cols)
    return QuantMatrix(op.pack(gguf_rows(qtype, n_rows, n_cols, seed)), qtype, n_rows, n_cols, op)


@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q4_K, _T.Q5_0], ids=lambda t: t.name)
def test_fuse_swiglu_interleaves_gate_and_up_rows(qtype):
    n_rows, n_cols = 5, 256
    gate, up = _matrix(qtype, n_rows, n_cols, 1), _matrix(qtype, n_rows, n_cols, 2)
    fused = fuse_swiglu(gate, up)
    assert fused.interleaved and fused.n_out == 2 * n_rows and len(fused.parts) == 1
    matrix, _ = fused.parts[0]
    rows = matrix.raw.view(2 * n_rows, -1)
    assert torch.equal(rows[0::2], gate.raw.view(n_rows, -1))
    assert torch.equal(rows[1::2], up.raw.view(n_rows, -1))
    assert matrix.n_rows == 2 * n_rows and matrix.raw.numel() == 2 * n_rows * matrix.matvec.row_bytes


def test_fuse_swiglu_of_two_types_keeps_parts():
    gate, up = _matrix(_T.Q4_K, 3, 256, 1), _matrix(_T.Q6_K, 3, 256, 2)
    fused = fuse_swiglu(gate, up)
    assert not fused.interleaved
    assert [(m.ggml_type, col) for m, col in fused.parts] == [(_T.Q4_K, 0), (_T.Q6_K, 3)]
    with pytest.raises(CudaError, match="not interleaved"):
        fused.swiglu(torch.empty(1, 3), torch.empty(1, 256))


def test_split_rows_gives_both_halves():
    whole = _matrix(_T.Q8_0, 6, 96, 3)  # Phi-3's fused gate.up: gate rows, then up
    first, rest = split_rows(whole, 4)
    rows = whole.raw.view(6, -1)
    assert (first.n_rows, rest.n_rows) == (4, 2)
    assert torch.equal(first.raw.view(4, -1), rows[:4]) and torch.equal(rest.raw.view(2, -1), rows[4:])


def test_f16_dense_is_a_view_of_the_weights():
    """The prefill GEMM reads F16 weights in place: dense() is the rows themselves as fp16,
    equal to the reference dequantisation, sharing the weights' memory (no scratch)."""
    from gpu.cuda.qweights import QuantMatrix
    from loader.quants import dequantize

    n_rows, n_cols = 6, 64
    values = torch.from_numpy(np.random.default_rng(4).standard_normal((n_rows, n_cols)))
    raw = values.half().view(torch.uint8).reshape(-1)
    matrix = QuantMatrix(raw, _T.F16, n_rows, n_cols, MatVec(_T.F16, n_rows, n_cols))
    dense = matrix.dense()
    assert dense.dtype == torch.float16 and dense.shape == (n_rows, n_cols)
    assert dense.data_ptr() == raw.data_ptr()
    assert torch.equal(dense.float(), dequantize(raw, _T.F16, (n_rows, n_cols)).float())
