"""Each CUDA kernel against an independent torch reference, on fresh random inputs (run on the
device: `pytest -m gpu tests/gpu/test_cuda_kernels.py`).

References: loader/quants.dequantize + a float64 matmul, F.rms_norm's formula in float64,
gpu/rope.Rotary, and attention per sequence over its gathered blocks in float64. Outputs are
poisoned with NaN first, so an unwritten element fails; shapes include ragged ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from loader.config import RopeConfig
from loader.quants import dequantize
from loader.synth_blocks import random_blocks

pytestmark = pytest.mark.gpu

_T = GGMLQuantizationType
FP32_TOL = 1e-3
FP16_TOL = 1e-2


@pytest.fixture(scope="module", autouse=True)
def _device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(
        [abs(hash(str(k))) % 2**32 for k in key] + [int(torch.seed()) % 2**32]
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output: an element was left unwritten"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def random_weight(qtype: _T, n_rows: int, n_cols: int, rng: np.random.Generator) -> torch.Tensor:
    """The bytes of a GGUF tensor of n_rows x n_cols: valid random blocks, finite scales."""
    if qtype in (_T.F16, _T.BF16, _T.F32):
        values = torch.from_numpy(rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.05)
        dtype = {_T.F16: torch.float16, _T.BF16: torch.bfloat16, _T.F32: torch.float32}[qtype]
        return values.to(dtype).view(torch.uint8).reshape(-1).cuda()
    from gguf import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, n_rows * n_cols // block, 0.05, rng)
    return torch.from_numpy(blocks.reshape(-1).copy()).cuda()


def nan_tensor(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device="cuda")


# --- matvec -------------------------------------------------------------------------------------

from gpu.cuda.matvec import MATVEC_TYPES, MatVec  # noqa: E402

MATVEC_SHAPES = [(1, 256, 1), (37, 512, 3), (129, 1024, 8), (300, 2816, 5), (1000, 4096, 2)]


@pytest.mark.parametrize(("n_rows", "n_cols", "n_seqs"), MATVEC_SHAPES)
@pytest.mark.parametrize("qtype", list(MATVEC_TYPES), ids=lambda t: t.name)
def test_matvec_matches_dequantised_matmul(qtype, n_rows, n_cols, n_seqs):
    _check_matvec(qtype, n_rows, n_cols, n_seqs, _rng("matvec", qtype, n_rows))


def _check_matvec(qtype, n_rows, n_cols, n_seqs, rng):
    """Our matvec on random blocks equals a float64 matmul of the reference dequantisation."""
    weight = random_weight(qtype, n_rows, n_cols, rng)
    x = torch.randn(n_seqs, n_cols, device="cuda")
    y = nan_tensor(n_seqs, n_rows)
    op = MatVec(qtype, n_rows, n_cols)
    op(y, x, op.pack(weight))
    ref = x.double() @ dequantize(weight, qtype, (n_rows, n_cols)).double().T
    assert rel_error(y, ref) <= FP32_TOL


@pytest.mark.parametrize("n_cols", [32, 96, 160])
@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q8_0], ids=lambda t: t.name)
def test_matvec_packed_rows_with_padding(qtype, n_cols):
    """Repacked types on rows that are not a multiple of 16 bytes (padded in the matvec layout)."""
    _check_matvec(qtype, 45, n_cols, 3, _rng("padded", qtype, n_cols))


@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q4_K, _T.F16], ids=lambda t: t.name)
def test_matvec_bias_residual_and_strided_rows(qtype):
    n_rows, n_cols, n_seqs = 77, 512, 4
    weight = random_weight(qtype, n_rows, n_cols, _rng("epilogue", qtype))
    x = torch.randn(n_seqs, n_cols + 12, device="cuda")[:, :n_cols]  # row stride 524
    bias = torch.randn(n_rows, device="cuda")
    residual = torch.randn(n_seqs, n_rows, device="cuda")
    ref = x.double() @ dequantize(weight, qtype, (n_rows, n_cols)).double().T
    ref = ref + bias.double() + residual.double()
    y = residual.clone()
    op = MatVec(qtype, n_rows, n_cols)
    op(y, x, op.pack(weight), bias=bias, residual=y)  # in place: y += W x + b
    assert rel_error(y, ref) <= FP32_TOL


@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q5_1, _T.Q8_0, _T.Q4_K, _T.Q6_K, _T.BF16],
                         ids=lambda t: t.name)  # fmt: skip
def test_matvec_is_batch_invariant(qtype):
    """Sequence 0's result is bit-identical whatever the other sequences are, at any batch."""
    n_rows, n_cols = 203, 1024
    op = MatVec(qtype, n_rows, n_cols)
    weight = op.pack(random_weight(qtype, n_rows, n_cols, _rng("invariance", qtype)))
    first = torch.randn(1, n_cols, device="cuda")
    results = []
    for n_seqs in (1, 2, 3, 5, 8, 8):
        x = torch.cat([first, torch.randn(n_seqs - 1, n_cols, device="cuda")])
        y = nan_tensor(n_seqs, n_rows)
        op(y, x, weight)
        results.append(y[0].clone())
    for other in results[1:]:
        assert torch.equal(other, results[0])


# --- dequantise rows / embedding ----------------------------------------------------------------

from gpu.cuda.embedding import DEQUANT_TYPES, DequantRows  # noqa: E402


@pytest.mark.parametrize("n_cols", [256, 768])
@pytest.mark.parametrize("qtype", list(DEQUANT_TYPES), ids=lambda t: t.name)
def test_embedding_lookup_is_bit_exact(qtype, n_cols):
    n_rows = 53
    table = random_weight(qtype, n_rows, n_cols, _rng("embd", qtype, n_cols))
    token_ids = torch.tensor([0, 52, 7, 7, 19, 3, 52], dtype=torch.int64, device="cuda")
    out = nan_tensor(len(token_ids), n_cols)
    op = DequantRows(qtype, n_cols)
    op.lookup(out, table, token_ids)
    ref = dequantize(table, qtype, (n_rows, n_cols))
    assert torch.equal(out, ref[token_ids])
    rows = nan_tensor(11, n_cols)
    op.rows(rows, table, first_row=40)
    assert torch.equal(rows, ref[40:51])


@pytest.mark.parametrize("n_cols", [256, 768])
@pytest.mark.parametrize("qtype", list(DEQUANT_TYPES), ids=lambda t: t.name)
def test_dequant_rows_to_fp16_round_as_torch(qtype, n_cols):
    """The prefill scratch in one pass: bit-equal to the float32 dequantisation .half()-ed,
    every element written (poisoned first), into a row-strided view."""
    n_rows = 37
    table = random_weight(qtype, n_rows, n_cols, _rng("half", qtype, n_cols))
    wide = torch.full((13, n_cols + 8), float("nan"), dtype=torch.float16, device="cuda")
    out = wide[:, :n_cols]
    DequantRows(qtype, n_cols).rows(out, table, first_row=20)
    ref = dequantize(table, qtype, (n_rows, n_cols))[20:33].half()
    assert torch.equal(out, ref)
    assert wide[:, n_cols:].isnan().all()  # nothing past the row written


@pytest.mark.parametrize("n_cols", [96, 256, 4096])  # 96: packed rows; 256, 4096: 4-block groups
@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q8_0], ids=lambda t: t.name)
def test_dequant_rows_to_fp16_from_the_matvec_layout(qtype, n_cols):
    """The prefill reads repacked Q4_0/Q8_0 weights as stored: the same fp16 values as the GGUF
    blocks give."""
    n_rows = 29
    table = random_weight(qtype, n_rows, n_cols, _rng("half-packed", qtype, n_cols))
    op = MatVec(qtype, n_rows, n_cols)
    out = torch.full((n_rows - 4, n_cols), float("nan"), dtype=torch.float16, device="cuda")
    DequantRows(qtype, n_cols, matvec_layout=True).rows(out, op.pack(table), first_row=4)
    assert torch.equal(out, dequantize(table, qtype, (n_rows, n_cols))[4:].half())
    with pytest.raises(CudaError, match="only into fp16"):
        DequantRows(qtype, n_cols, matvec_layout=True).rows(nan_tensor(2, n_cols), op.pack(table))


# --- RMSNorm ------------------------------------------------------------------------------------

from gpu.cuda.norm import RMSNorm  # noqa: E402


def _rms_ref(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize(
    ("n_rows", "hidden"),
    # vector kernel: 64 .. 16384; scalar: 1002 (not float4s), 16388 (over the vector kernel's 16384)
    [(1, 64), (5, 576), (3, 1000), (33, 4096), (2, 5120), (3, 16384), (3, 1002), (2, 16388)],
)
def test_rms_norm(n_rows, hidden):
    eps = 1e-5
    x = torch.randn(n_rows, hidden, device="cuda") * 3
    weight = torch.randn(hidden, device="cuda")
    out = nan_tensor(n_rows, hidden)
    RMSNorm(hidden, eps)(out, x, weight)
    assert rel_error(out, _rms_ref(x, weight, eps)) <= FP32_TOL
    assert rel_error(out, F.rms_norm(x, (hidden,), weight, eps)) <= FP32_TOL


def test_rms_norm_misaligned_rows_take_the_scalar_kernel():
    n_rows, hidden, eps = 4, 576, 1e-5
    wide = torch.randn(n_rows, hidden + 1, device="cuda")
    x = wide[:, 1:]  # rows start 4 bytes past a float4 boundary
    weight = torch.randn(hidden, device="cuda")
    out = nan_tensor(n_rows, hidden)
    RMSNorm(hidden, eps)(out, x, weight)
    assert rel_error(out, _rms_ref(x, weight, eps)) <= FP32_TOL


@pytest.mark.parametrize("hidden", [576, 4096, 1002])
def test_rms_norm_fused_residual(hidden):
    n_rows, eps = 7, 1e-6
    x = torch.randn(n_rows, hidden, device="cuda")
    residual = torch.randn(n_rows, hidden, device="cuda")
    expected_h = residual.double() + x.double()
    weight = torch.randn(hidden, device="cuda")
    out = nan_tensor(n_rows, hidden)
    RMSNorm(hidden, eps)(out, x, weight, residual=residual)
    assert rel_error(residual, expected_h) <= 1e-6
    assert rel_error(out, _rms_ref(expected_h, weight, eps)) <= FP32_TOL


# --- SiLU(gate) * up ----------------------------------------------------------------------------

from gpu.cuda.activation import SiluMul  # noqa: E402


@pytest.mark.parametrize(("n_tokens", "ffn"), [(1, 1), (3, 1536), (8, 14336), (5, 1000)])
def test_silu_mul(n_tokens, ffn):
    gate_up = torch.randn(n_tokens, 2 * ffn, device="cuda") * 4
    out = nan_tensor(n_tokens, ffn)
    SiluMul(ffn)(out, gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert rel_error(out, F.silu(gate) * up) <= FP32_TOL


# --- RoPE + KV write ----------------------------------------------------------------------------

from gpu.cuda.rope_kv import RopeKVWrite  # noqa: E402
from gpu.rope import Rotary  # noqa: E402

ROPE_CASES = [  # n_heads, n_kv_heads, head_dim, rot_dim, neox
    (9, 3, 64, 64, False),  # SmolLM2
    (32, 8, 128, 128, False),  # Llama 3
    (14, 2, 64, 64, True),  # Qwen2
    (4, 2, 96, 48, True),  # partial rotary, NeoX
    (4, 4, 80, 40, False),  # partial rotary, normal
]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim", "rot_dim", "neox"), ROPE_CASES)
def test_rope_kv_write(n_heads, n_kv_heads, head_dim, rot_dim, neox, cache_dtype):
    block_size, num_blocks, n_tokens = 16, 40, 13
    rotary = Rotary(RopeConfig(base=10000.0, dim=rot_dim, neox=neox), device="cuda")
    width = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = torch.randn(n_tokens, width, device="cuda")
    positions = torch.tensor([0, 1, 16, 17, 299, 300, 1999, 2000, 5, 4095, 70000, 3, 8],
                             dtype=torch.int64, device="cuda")  # fmt: skip
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:n_tokens]
    slots[4] = -1  # a padding token: rotated Q, no cache write
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device="cuda")
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device="cuda")
    cos, sin = rotary.cos_sin(positions)
    heads = qkv.view(n_tokens, n_heads + 2 * n_kv_heads, head_dim)
    ref_qk = rotary.apply(heads[:, : n_heads + n_kv_heads].double().float(), cos, sin)
    ref_v = heads[:, n_heads + n_kv_heads :].clone()
    RopeKVWrite(n_heads, n_kv_heads, head_dim, rot_dim, neox, cache_dtype)(
        qkv, positions, slots, rotary.inv_freq, k_cache, v_cache
    )
    tol = FP32_TOL if cache_dtype == torch.float32 else FP16_TOL
    assert rel_error(heads[:, :n_heads], ref_qk[:, :n_heads]) <= FP32_TOL
    written = slots >= 0
    k_flat = k_cache.view(-1, n_kv_heads, head_dim)
    v_flat = v_cache.view(-1, n_kv_heads, head_dim)
    assert rel_error(k_flat[slots[written]].float(), ref_qk[written, n_heads:]) <= tol
    assert rel_error(v_flat[slots[written]].float(), ref_v[written]) <= tol
    untouched = torch.ones(k_flat.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots[written]] = False
    assert (
        torch.isnan(k_flat[untouched].float()).all()
        and torch.isnan(v_flat[untouched].float()).all()
    )


# --- decode attention ---------------------------------------------------------------------------

from gpu.cuda.attention import DecodeAttention  # noqa: E402
from tests.gpu.paged_attention import attention_reference, paged_cache  # noqa: E402

ATTENTION_CASES = [  # n_heads, n_kv_heads, head_dim, block_size, context lengths
    (32, 8, 128, 16, [1, 17, 300, 2000]),
    (9, 3, 64, 16, [17]),
    (14, 2, 64, 32, [2000, 1, 300, 257, 256, 255, 33, 5]),
    (4, 4, 80, 16, [300, 1]),
    (8, 1, 256, 16, [700]),
]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim", "block_size", "contexts"),
                         ATTENTION_CASES)  # fmt: skip
def test_decode_attention(n_heads, n_kv_heads, head_dim, block_size, contexts, cache_dtype):
    k_cache, v_cache, tables = paged_cache(n_kv_heads, head_dim, block_size, contexts, cache_dtype)
    n_seqs = len(contexts)
    q = torch.randn(n_seqs, (n_heads + 2 * n_kv_heads) * head_dim, device="cuda")  # fused qkv rows
    context_lens = torch.tensor(contexts, dtype=torch.int64, device="cuda")
    out = nan_tensor(n_seqs, n_heads * head_dim)
    op = DecodeAttention(n_heads, n_kv_heads, head_dim, block_size, cache_dtype)
    op(out, q, k_cache, v_cache, tables, context_lens, max(contexts))
    ref = attention_reference(q, k_cache, v_cache, tables, [1] * n_seqs, contexts, n_heads)
    assert rel_error(out, ref) <= FP32_TOL  # the cache values are the inputs: exact either dtype
    # The split combine's ticket counters are left at zero, so the next launch combines too.
    if op._counters is not None:
        assert not op._counters.any()
    again = nan_tensor(n_seqs, n_heads * head_dim)
    op(again, q, k_cache, v_cache, tables, context_lens, max(contexts))
    assert torch.equal(again, out)


def test_decode_attention_is_batch_invariant():
    n_heads, n_kv_heads, head_dim, block_size = 32, 8, 128, 16
    contexts = [200, 2000, 17, 900]
    k_cache, v_cache, tables = paged_cache(
        n_kv_heads, head_dim, block_size, contexts, torch.float16
    )
    q = torch.randn(4, n_heads * head_dim, device="cuda")
    lens = torch.tensor(contexts, dtype=torch.int64, device="cuda")
    op = DecodeAttention(n_heads, n_kv_heads, head_dim, block_size, torch.float16)
    full = nan_tensor(4, n_heads * head_dim)
    op(full, q, k_cache, v_cache, tables, lens, max(contexts))
    for i in range(4):  # each sequence alone (fewer splits for most of them)
        alone = nan_tensor(1, n_heads * head_dim)
        op(alone, q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], contexts[i])
        assert torch.equal(alone[0], full[i])


# Contexts around the 64-token split: one token, one split short / exact / one over, a few
# splits, many (32 splits: runs of 2, 3 and 8 leave a short last run).
SPLIT_RUN_CONTEXTS = [1, 63, 64, 65, 200, 2000]
SPLITS_PER_CTA = [1, 2, 3, 8]


def _decode_batch(n_heads, n_kv_heads, head_dim, block_size, contexts, cache_dtype,
                  table_columns=0):  # fmt: skip
    """Random q, a paged cache and its tables (widened to `table_columns` with -1 padding, as
    the engine's graphs see them), the contexts as a device tensor."""
    k_cache, v_cache, tables = paged_cache(n_kv_heads, head_dim, block_size, contexts, cache_dtype)
    if table_columns > tables.shape[1]:
        pad = torch.full((len(contexts), table_columns - tables.shape[1]), -1, dtype=torch.int32,
                         device="cuda")  # fmt: skip
        tables = torch.cat([tables, pad], dim=1)
    q = torch.randn(len(contexts), n_heads * head_dim, device="cuda")
    lens = torch.tensor(contexts, dtype=torch.int64, device="cuda")
    return q, k_cache, v_cache, tables, lens


@pytest.mark.parametrize("splits_per_cta", SPLITS_PER_CTA)
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim", "cache_dtype"), [
    (32, 8, 128, torch.float16),  # the 8B shape: 16 lanes, 512 threads, ATTN_MIN_BLOCKS
    (14, 2, 64, torch.float32),  # 8 lanes, 256 threads
    (8, 1, 256, torch.float16),  # 32 lanes: 4 tokens a thread
], ids=["f16-128", "f32-64", "f16-256"])  # fmt: skip
def test_decode_attention_walks_split_runs(n_heads, n_kv_heads, head_dim, cache_dtype,
                                           splits_per_cta):  # fmt: skip
    """A CTA walking runs of 1, 2, 3 or 8 splits: every output written and equal to the
    reference, for sequences of every length around a split in one batch; also with the grid
    sized for a longer context than any (a graph's bucket), where whole runs are past the end."""
    block_size = 16
    q, k_cache, v_cache, tables, lens = _decode_batch(
        n_heads, n_kv_heads, head_dim, block_size, SPLIT_RUN_CONTEXTS, cache_dtype,
        table_columns=4096 // block_size,
    )  # fmt: skip
    n_seqs = len(SPLIT_RUN_CONTEXTS)
    ref = attention_reference(q, k_cache, v_cache, tables, [1] * n_seqs, SPLIT_RUN_CONTEXTS,
                              n_heads)  # fmt: skip
    op = DecodeAttention(n_heads, n_kv_heads, head_dim, block_size, cache_dtype)
    op.splits_per_cta = splits_per_cta
    for max_context in (max(SPLIT_RUN_CONTEXTS), 4096):
        out = nan_tensor(n_seqs, n_heads * head_dim)
        op(out, q, k_cache, v_cache, tables, lens, max_context)
        assert rel_error(out, ref) <= FP32_TOL, f"max_context {max_context}"
        assert not op._counters.any()  # every pair's last CTA reset its ticket counter


def test_decode_attention_bits_do_not_depend_on_runs_or_batch():
    """Batch invariance with runs: a sequence's output is torch.equal whatever the splits per
    CTA (pinned or the launcher's pick), the batch around it (alone, in its batch, in a batch of
    64 where the launcher walks many splits per CTA) and the grid's max context."""
    n_heads, n_kv_heads, head_dim, block_size = 32, 8, 128, 16
    contexts = SPLIT_RUN_CONTEXTS
    n_seqs, width = len(contexts), n_heads * head_dim
    q, k_cache, v_cache, tables, lens = _decode_batch(
        n_heads, n_kv_heads, head_dim, block_size, contexts, torch.float16,
        table_columns=4096 // block_size,
    )  # fmt: skip
    op = DecodeAttention(n_heads, n_kv_heads, head_dim, block_size, torch.float16)
    base = nan_tensor(n_seqs, width)
    op.splits_per_cta = 1
    op(base, q, k_cache, v_cache, tables, lens, max(contexts))
    for splits_per_cta in (*SPLITS_PER_CTA, None):
        op.splits_per_cta = splits_per_cta
        for max_context in (max(contexts), 4096):
            out = nan_tensor(n_seqs, width)
            op(out, q, k_cache, v_cache, tables, lens, max_context)
            assert torch.equal(out, base), f"{splits_per_cta} per CTA, max_context {max_context}"
        for i, context in enumerate(contexts):  # alone: fewer splits, a single one for i < 3
            alone = nan_tensor(1, width)
            op(alone, q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], context)
            assert torch.equal(alone[0], base[i]), f"{splits_per_cta} per CTA, context {context}"
    # 64 sequences over the same blocks (each row a copy of one of the six): the launcher's
    # pick walks several splits per CTA there.
    rows = torch.arange(64, device="cuda") % n_seqs
    big = nan_tensor(64, width)
    op.splits_per_cta = None
    op(big, q[rows], k_cache, v_cache, tables[rows], lens[rows], max(contexts))
    assert torch.equal(big, base[rows])


# --- decode input staging -----------------------------------------------------------------------

from gpu.cuda.decode_inputs import DecodeInputStager  # noqa: E402
from gpu.cuda.errors import CudaError  # noqa: E402


def test_stage_decode_inputs_copies_rows_and_pads_the_bucket():
    device = torch.device("cuda")
    stager = DecodeInputStager(cap=8, table_width=6, device=device)
    stager.rows.fill_(99)
    stager.tables.fill_(99)
    ids = torch.tensor([5, 6, 7], device=device)
    positions = torch.tensor([40, 3, 17], device=device)
    slots = torch.tensor([104, 33, 17], device=device)
    context = torch.tensor([41, 4, 18], device=device)
    tables = torch.tensor([[6, 2, 1, 0], [2, -1, -1, -1], [1, 3, -1, -1]], dtype=torch.int32,
                          device=device)  # fmt: skip
    stager.stage(4, ids, positions, slots, context, tables)
    rows = stager.rows.cpu()
    assert rows[:, :3].tolist() == [[5, 6, 7], [40, 3, 17], [104, 33, 17], [41, 4, 18]]
    assert rows[:, 3].tolist() == [0, 0, -1, 1]  # padding row: no KV write, one token
    assert (rows[:, 4:] == 99).all()  # past the bucket: untouched
    got = stager.tables.cpu()
    assert torch.equal(got[:3, :4], tables.cpu())
    assert got[3, 0] == 0  # padding row reads block 0
    assert (got[:3, 4:] == 99).all() and (got[4:] == 99).all()


def test_stage_decode_inputs_refuses_wider_tables():
    device = torch.device("cuda")
    stager = DecodeInputStager(cap=4, table_width=2, device=device)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(CudaError, match="table columns"):
        stager.stage(1, one, one, one, one, torch.zeros(1, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("n_seqs", [1, 3, 8, 11])
@pytest.mark.parametrize("qtype", [_T.Q4_0, _T.Q8_0, _T.Q4_K, _T.Q5_0, _T.F16], ids=lambda t: t.name)
def test_matvec_swiglu_epilogue(qtype, n_seqs):
    """Interleaved (gate, up) rows: the epilogue writes silu(W_g x) * (W_u x), every element
    (NaN-poisoned output; 77 pairs leave a ragged last CTA)."""
    from gpu.cuda.qweights import QuantMatrix, fuse_swiglu

    ffn, n_cols = 77, 512
    rng = _rng("swiglu", qtype, n_seqs)
    parts = []
    for _ in range(2):
        raw = random_weight(qtype, ffn, n_cols, rng)
        op = MatVec(qtype, ffn, n_cols)
        parts.append((raw, QuantMatrix(op.pack(raw), qtype, ffn, n_cols, op)))
    fused = fuse_swiglu(parts[0][1], parts[1][1])
    x = torch.randn(n_seqs, n_cols, device="cuda")
    out = nan_tensor(n_seqs, ffn)
    fused.swiglu(out, x)
    gate, up = (x.double() @ dequantize(raw, qtype, (ffn, n_cols)).double().T for raw, _ in parts)
    assert rel_error(out, F.silu(gate) * up) <= FP32_TOL


def test_silu_mul_interleaved_matches_split_layout():
    n_tokens, ffn = 5, 300
    gate, up = torch.randn(n_tokens, ffn, device="cuda"), torch.randn(n_tokens, ffn, device="cuda")
    interleaved = torch.stack([gate, up], dim=2).reshape(n_tokens, 2 * ffn)
    out = nan_tensor(n_tokens, ffn)
    SiluMul(ffn)(out, interleaved, interleaved=True)
    assert rel_error(out, F.silu(gate.double()) * up.double()) <= FP32_TOL
