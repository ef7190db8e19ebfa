"""Prefill attention (gpu/cuda/prefill_attention.py): the launch geometry on the CPU, the kernels
on the device (`pytest -m gpu tests/gpu/test_prefill_attention.py`).

Reference: per sequence, causal softmax attention in float64 over its cache blocks gathered
through the block table, queries at the bottom right of the mask (cached prefix included).
Outputs are poisoned with NaN first, so an element left unwritten fails.
"""

from __future__ import annotations

import pytest
import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.prefill_attention import (
    F32_ROWS,
    MMA_ROWS,
    PREFILL_THREADS,
    PrefillAttention,
    padded_head_dim,
    prefill_attention_launch_config,
)
from tests.gpu.paged_attention import attention_reference, paged_cache

TENSOR_CORE_TOL = 1e-2  # q and p rounded to fp16 for the mma
FP32_TOL = 1e-3


def gpu(test):
    """Deselected by default (the gpu marker); skipped where there is no CUDA device."""
    needs_device = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    return pytest.mark.gpu(needs_device(test))


# --- launch geometry (CPU) ----------------------------------------------------------------------


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(8, 8), (12, 4), (32, 8), (16, 2)])
@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [([1, 7, 64, 130], [1, 7, 64, 130]), ([45], [345]), ([0, 3, 1000], [5, 3, 1200]), ([1], [1])],
)
def test_tiles_cover_every_query_once(n_heads, n_kv_heads, tensor_cores, query_lens, context_lens):
    launch = prefill_attention_launch_config(
        query_lens, context_lens, n_heads, n_kv_heads, 128, tensor_cores
    )
    group = n_heads // n_kv_heads
    rows = MMA_ROWS if tensor_cores else F32_ROWS[128]
    assert launch.tile_tokens == rows // group
    assert launch.config.block == (PREFILL_THREADS, 1, 1)
    assert launch.config.grid == (len(launch.tiles), n_kv_heads, 1)
    assert len(launch.tiles) == sum(-(-n // launch.tile_tokens) for n in query_lens)
    covered = [[0] * n for n in query_lens]
    for seq, first in launch.tiles:
        assert first % launch.tile_tokens == 0  # tiles never depend on the other sequences
        for j in range(first, min(first + launch.tile_tokens, query_lens[seq])):
            covered[seq][j] += 1
    assert all(count == 1 for seq in covered for count in seq)
    keys = [
        context_lens[s] - query_lens[s] + min(f + launch.tile_tokens, query_lens[s])
        for s, f in launch.tiles
    ]
    assert keys == sorted(keys, reverse=True)  # heaviest tiles first


@pytest.mark.parametrize(("head_dim", "mma", "f32"),
                         [(8, 64, 64), (64, 64, 64), (80, 96, 128), (96, 96, 128),
                          (128, 128, 128), (136, 256, 256), (256, 256, 256)])  # fmt: skip
def test_head_dim_padding(head_dim, mma, f32):
    assert padded_head_dim(head_dim, True) == mma
    assert padded_head_dim(head_dim, False) == f32


@pytest.mark.parametrize("head_dim", [0, 4, 100, 260, 264])
def test_refuses_head_dims(head_dim):
    with pytest.raises(CudaError, match="head_dim"):
        PrefillAttention(32, 8, head_dim, 16)


def test_config_refuses_bad_batches():
    with pytest.raises(CudaError):
        prefill_attention_launch_config([5], [4], 32, 8, 128)  # context shorter than the queries
    with pytest.raises(CudaError):
        prefill_attention_launch_config([0, 0], [3, 4], 32, 8, 128)  # no query at all
    with pytest.raises(CudaError):
        prefill_attention_launch_config([1, 2], [2], 32, 8, 128)
    with pytest.raises(CudaError):
        prefill_attention_launch_config([4], [4], 30, 8, 128)  # not a whole group
    with pytest.raises(CudaError):
        prefill_attention_launch_config([4], [4], 32, 2, 128)  # 16 query heads per kv head


def test_refuses_tensor_cores_on_an_fp32_cache():
    with pytest.raises(CudaError, match="fp16"):
        PrefillAttention(32, 8, 128, 16, cache_dtype=torch.float32, tensor_cores=True)


# --- kernels (device) ---------------------------------------------------------------------------


def paged_inputs(n_heads, n_kv_heads, head_dim, block_size, query_lens, context_lens, dtype):
    """Random K/V in shuffled blocks (tables padded with -1, a column slice of a wider tensor:
    row stride != width) and q as the head of fused qkv rows."""
    k_cache, v_cache, tables = paged_cache(n_kv_heads, head_dim, block_size, context_lens, dtype,
                                           extra_columns=3)  # fmt: skip
    num_tokens = sum(query_lens)
    qkv = 2 * torch.randn(num_tokens, (n_heads + 2 * n_kv_heads) * head_dim, device="cuda")
    starts = torch.tensor([0, *query_lens], device="cuda").cumsum(0)
    lens = torch.tensor(context_lens, dtype=torch.int64, device="cuda")
    return qkv[:, : n_heads * head_dim], k_cache, v_cache, tables, starts, lens


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output: an element was left unwritten"
    return float((out.double() - ref).abs().max() / ref.abs().max())


PREFILL_CASES = {  # n_heads, n_kv_heads, head_dim, block_size, query lens, context lens
    "ragged-g4-d128": (32, 8, 128, 16, [1, 7, 64, 130], [1, 7, 64, 130]),
    "prefix-g3-d96": (12, 4, 96, 16, [45], [345]),
    "mixed-g1-d64-b32": (8, 8, 64, 32, [130, 5, 64], [130, 205, 700]),
    "g8-d64": (16, 2, 64, 16, [33, 1, 100], [40, 50, 100]),
    "g4-d80": (8, 2, 80, 16, [70, 3], [70, 90]),
    "g8-d256": (8, 1, 256, 32, [40, 1], [75, 17]),
}
# (cache dtype, tensor cores, tolerance)
MATHS = {
    "mma": (torch.float16, True, TENSOR_CORE_TOL),
    "f32-f16cache": (torch.float16, False, FP32_TOL),
    "f32-f32cache": (torch.float32, False, FP32_TOL),
}


@gpu
@pytest.mark.parametrize("math", list(MATHS))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention_matches_reference(case, math):
    n_heads, n_kv_heads, head_dim, block_size, query_lens, context_lens = PREFILL_CASES[case]
    cache_dtype, tensor_cores, tol = MATHS[math]
    q, k_cache, v_cache, tables, starts, lens = paged_inputs(
        n_heads, n_kv_heads, head_dim, block_size, query_lens, context_lens, cache_dtype
    )
    out = torch.full((q.shape[0], n_heads * head_dim), float("nan"), device="cuda")
    op = PrefillAttention(n_heads, n_kv_heads, head_dim, block_size, cache_dtype, tensor_cores)
    op(out, q, k_cache, v_cache, tables, starts, lens, query_lens, context_lens)
    ref = attention_reference(q, k_cache, v_cache, tables, query_lens, context_lens, n_heads)
    assert max_rel_error(out, ref) <= tol


@gpu
@pytest.mark.parametrize("tensor_cores", [True, False])
def test_prefill_attention_is_deterministic_and_batch_invariant(tensor_cores):
    """A sequence's rows are bit-identical run to run and whatever else is in the batch."""
    n_heads, n_kv_heads, head_dim, block_size = 32, 8, 128, 16
    query_lens, context_lens = [45, 130, 7], [345, 130, 20]
    q, k_cache, v_cache, tables, starts, lens = paged_inputs(
        n_heads, n_kv_heads, head_dim, block_size, query_lens, context_lens, torch.float16
    )
    op = PrefillAttention(n_heads, n_kv_heads, head_dim, block_size, tensor_cores=tensor_cores)
    runs = []
    for _ in range(2):
        out = torch.full((q.shape[0], n_heads * head_dim), float("nan"), device="cuda")
        runs.append(op(out, q, k_cache, v_cache, tables, starts, lens, query_lens, context_lens))
    assert torch.equal(runs[0], runs[1])
    alone = torch.full((130, n_heads * head_dim), float("nan"), device="cuda")
    one_start = torch.tensor([0, 130], device="cuda")
    op(alone, q[45:175], k_cache, v_cache, tables[1:2], one_start, lens[1:2], [130], [130])
    assert torch.equal(alone, runs[0][45:175])


@gpu
def test_prefill_attention_refuses_bad_inputs():
    q, k_cache, v_cache, tables, starts, lens = paged_inputs(8, 2, 64, 16, [5], [9], torch.float16)
    op = PrefillAttention(8, 2, 64, 16)
    out = torch.empty(5, 8 * 64, device="cuda")
    with pytest.raises(CudaError, match="q"):
        op(out, q.half(), k_cache, v_cache, tables, starts, lens, [5], [9])
    with pytest.raises(CudaError, match="k_cache"):
        op(out, q, k_cache.float(), v_cache, tables, starts, lens, [5], [9])
    with pytest.raises(CudaError, match="q"):
        op(out, q[:4], k_cache, v_cache, tables, starts, lens, [5], [9])
    with pytest.raises(CudaError, match="narrow"):
        op(out, q, k_cache, v_cache, tables[:, :0], starts, lens, [5], [9])
