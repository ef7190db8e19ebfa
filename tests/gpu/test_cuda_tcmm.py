"""The tensor-core matmul (gpu/kernels/tcmm.cu) against the torch reference on fresh random
inputs, every quantised type (run on the device: `pytest -m gpu tests/gpu/test_cuda_tcmm.py`).

Reference: loader/quants.dequantize, rounded to fp16 as the kernel rounds each weight, times x
rounded to fp16, summed in float64. Outputs are NaN-poisoned first; shapes include ragged row
and column counts, batches across the n-tile variants and past one 64-sequence tile, and shapes
with and without the split-K path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from gpu.cuda.matvec import MATVEC_TYPES, MatVec
from gpu.cuda.tcmm import TcWorkspace, TensorCoreMatmul, ToHalf, split_count
from loader.quants import dequantize
from tests.gpu.test_cuda_kernels import _rng, nan_tensor, random_weight, rel_error

pytestmark = pytest.mark.gpu

_T = GGMLQuantizationType
FP16_TOL = 1e-2
BATCHES = (1, 3, 8, 17, 64, 256)


@pytest.fixture(scope="module", autouse=True)
def _device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def _op(qtype, n_rows, n_cols, max_seqs=256):
    op = TensorCoreMatmul(qtype, n_rows, n_cols, _sm_count())
    partials, tickets = op.workspace_needs(max_seqs)
    return op, TcWorkspace.sized(partials, tickets, torch.device("cuda"))


def _reference(raw, qtype, n_rows, n_cols, x16):
    w = dequantize(raw, qtype, (n_rows, n_cols)).half().double()
    return x16.double() @ w.T


def _shapes():
    # (rows, cols): a ragged row tile, K tails (not a multiple of 256), one with a split K and
    # one big enough for a single split on any GPU
    return [(37, 512), (300, 2816), (129, 1056), (4096, 1024)]


@pytest.mark.parametrize("qtype", list(MATVEC_TYPES), ids=lambda t: t.name)
def test_tcmm_matches_dequantised_matmul(qtype):
    for n_rows, n_cols in _shapes():
        if n_cols % MATVEC_TYPES[qtype][1]:
            continue  # K-quants take whole 256-element super-blocks
        rng = _rng("tcmm", qtype, n_rows, n_cols)
        raw = random_weight(qtype, n_rows, n_cols, rng)
        op, ws = _op(qtype, n_rows, n_cols)
        weight = MatVec(qtype, n_rows, n_cols).pack(raw)
        for n_seqs in BATCHES:
            x16 = torch.randn(n_seqs, n_cols, device="cuda").half()
            y = nan_tensor(n_seqs, n_rows)
            op(y, x16, weight, ws)
            err = rel_error(y, _reference(raw, qtype, n_rows, n_cols, x16))
            assert err <= FP16_TOL, (n_rows, n_cols, n_seqs, err)


@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q4_K, _T.Q6_K, _T.F16], ids=lambda t: t.name)
def test_tcmm_bias_residual_swiglu_and_half_input(qtype):
    """The epilogues and ToHalf: y += W x + b in place; silu(gate) * up of interleaved rows."""
    from gpu.cuda.qweights import QuantMatrix, fuse_swiglu

    n_rows, n_cols, n_seqs = 77 * 2, 512, 19
    rng = _rng("tc-epilogue", qtype)
    raw = random_weight(qtype, n_rows, n_cols, rng)
    op, ws = _op(qtype, n_rows, n_cols)
    weight = MatVec(qtype, n_rows, n_cols).pack(raw)
    x = torch.randn(n_seqs, n_cols + 12, device="cuda")[:, :n_cols]
    x16 = torch.full((n_seqs, n_cols + 8), float("nan"), device="cuda").half()
    ToHalf()(x16, x, n_cols)
    assert torch.equal(x16[:, :n_cols], x.half())
    bias = torch.randn(n_rows, device="cuda")
    residual = torch.randn(n_seqs, n_rows, device="cuda")
    ref = _reference(raw, qtype, n_rows, n_cols, x.half()) + bias.double() + residual.double()
    y = residual.clone()
    op(y, x16, weight, ws, bias=bias, residual=y)
    assert rel_error(y, ref) <= FP16_TOL

    ffn = 77
    parts = []
    for _ in range(2):
        part = random_weight(qtype, ffn, n_cols, rng)
        mv = MatVec(qtype, ffn, n_cols)
        parts.append((part, QuantMatrix(mv.pack(part), qtype, ffn, n_cols, mv)))
    fused = fuse_swiglu(parts[0][1], parts[1][1]).parts[0][0]
    op, ws = _op(qtype, 2 * ffn, n_cols)
    out = nan_tensor(n_seqs, ffn)
    op(out, x16, fused.raw, ws, swiglu=True)
    gate, up = (_reference(p, qtype, ffn, n_cols, x.half()) for p, _ in parts)
    assert rel_error(out, F.silu(gate) * up) <= FP16_TOL


@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q5_1, _T.Q8_0, _T.Q4_K, _T.Q6_K, _T.BF16],
                         ids=lambda t: t.name)  # fmt: skip
def test_tcmm_is_batch_invariant(qtype):
    """Sequence 0's result is bit-identical whatever the other sequences are, at every batch
    size and n-tile variant, on a split-K shape and a single-split one."""
    for n_rows, n_cols in ((203, 1024), (4096, 512)):
        op, ws = _op(qtype, n_rows, n_cols)
        weight = MatVec(qtype, n_rows, n_cols).pack(
            random_weight(qtype, n_rows, n_cols, _rng("tc-invariance", qtype, n_rows))
        )
        first = torch.randn(1, n_cols, device="cuda").half()
        results = []
        for n_seqs in (1, 2, 9, 17, 33, 64, 65, 256):
            x16 = torch.cat([first, torch.randn(n_seqs - 1, n_cols, device="cuda").half()])
            y = nan_tensor(n_seqs, n_rows)
            op(y, x16, weight, ws)
            results.append(y[0].clone())
        for other in results[1:]:
            assert torch.equal(other, results[0]), (n_rows, n_cols)


@pytest.mark.parametrize("qtype", list(MATVEC_TYPES), ids=lambda t: t.name)
def test_eight_warp_variant_gives_the_same_bits(qtype, monkeypatch):
    """WN = 2 (two warps along the sequences, `ORCD_TC_WARPS_N=2`) against WN = 1: bit-identical
    at every batch that reaches the 8-warp kernels (4 and 8 n tiles), with epilogues, on a
    split-K shape and a single-split one; NaN-poisoned outputs all written."""
    from gpu.cuda import tcmm

    for n_rows, n_cols in ((203, 1024), (4096, 512)):
        raw = random_weight(qtype, n_rows, n_cols, _rng("tc-w2", qtype, n_rows))
        weight = MatVec(qtype, n_rows, n_cols).pack(raw)
        bias = torch.randn(n_rows, device="cuda")
        for n_seqs in (17, 33, 64, 100, 256):
            x16 = torch.randn(n_seqs, n_cols, device="cuda").half()
            residual = torch.randn(n_seqs, n_rows, device="cuda")
            outs = []
            for wn in ("1", "2"):
                monkeypatch.setenv(tcmm.WARPS_N_ENV, wn)
                op, ws = _op(qtype, n_rows, n_cols)
                assert op.wn == int(wn)
                y = nan_tensor(n_seqs, n_rows)
                op(y, x16, weight, ws, bias=bias, residual=residual)
                assert not torch.isnan(y).any()
                outs.append(y)
            assert torch.equal(outs[0], outs[1]), (n_rows, n_cols, n_seqs)
            ref = _reference(raw, qtype, n_rows, n_cols, x16) + bias.double() + residual.double()
            assert rel_error(outs[1], ref) <= FP16_TOL


def test_split_count_depends_on_shape_only():
    assert split_count(4096, 4096, 132) > 1
    assert split_count(128256, 4096, 132) == 1


@pytest.mark.parametrize("hidden", [576, 4096, 4098])
def test_rms_norm_half_output_is_the_float_output_rounded(hidden):
    """The norms write the tensor cores' fp16 input themselves (vector and scalar kernels)."""
    from gpu.cuda.norm import RMSNorm

    norm = RMSNorm(hidden, 1e-5)
    x, weight = torch.randn(5, hidden, device="cuda"), torch.randn(hidden, device="cuda")
    out32 = nan_tensor(5, hidden)
    out16 = torch.full((5, -(-hidden // 8) * 8), float("nan"), device="cuda").half()
    norm(out32, x, weight)
    norm(out16, x, weight)
    assert torch.equal(out16[:, :hidden], out32.half())


def test_tcmm_swiglu_half_output_is_the_float_output_rounded():
    from gpu.cuda.qweights import QuantMatrix, fuse_swiglu

    qtype, ffn, n_cols, n_seqs = _T.Q4_K, 96, 512, 9
    rng = _rng("tc-swiglu-half")
    parts = []
    for _ in range(2):
        mv = MatVec(qtype, ffn, n_cols)
        parts.append(QuantMatrix(mv.pack(random_weight(qtype, ffn, n_cols, rng)), qtype, ffn,
                                 n_cols, mv))  # fmt: skip
    fused = fuse_swiglu(*parts).parts[0][0]
    op, ws = _op(qtype, 2 * ffn, n_cols)
    x16 = torch.randn(n_seqs, n_cols, device="cuda").half()
    out32, out16 = nan_tensor(n_seqs, ffn), torch.full((n_seqs, ffn), float("nan"), device="cuda")
    out16 = out16.half()
    op(out32, x16, fused.raw, ws, swiglu=True)
    op(out16, x16, fused.raw, ws, swiglu=True)
    assert torch.equal(out16, out32.half())
