"""Decode attention over the paged KV cache (gpu/kernels/attention.cu): one query token per
sequence, GQA-aware, split over the context in fixed partitions, each CTA walking a run of
consecutive splits; the last CTA of a (sequence, kv head) to finish combines the splits in order
(a ticket counter per pair, reset by that CTA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu.cuda.driver import multiprocessor_count
from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride
from gpu.cuda.rope_kv import CACHE_DTYPES

# Tokens per split (ATTN_PARTITION in attention.cu, compiled in). Fixed (never derived from the
# batch) so that a sequence's result does not depend on the other sequences: that is what makes
# decode batch-invariant. Small, so that a batch-1 step over a few hundred tokens still spreads
# over enough CTAs (kv heads x splits).
PARTITION_TOKENS = 64
# CTAs per SM the launcher aims the grid at when it picks splits per CTA: a CTA that walks
# several splits pays its fixed cost (q to shared memory, the ticket, the pipeline's fill) once,
# and ~3 resident CTAs per SM x 2 waves still leave the scheduler work to balance. A choice of
# speed only: the output does not depend on it.
TARGET_CTAS_PER_SM = 6
ATTENTION_THREADS = 512  # threads per CTA for head_dim > 64 (RowGroups in attention.cu)
MAX_ROW_GROUPS = 32
MAX_GROUP = 8  # MAX_G: query heads per kv head
MAX_HEAD_DIM = 256
_DECODE_ARGS = ("ptr", "i32", "ptr", "i32", "ptr", "ptr", "ptr", "i32", "ptr",
                "i32", "i32", "i32", "i32", "f32", "i32", "i32", "ptr", "ptr", "ptr")  # fmt: skip


def row_lanes(head_dim: int) -> int:
    """Lanes that hold one K/V row, 8 elements each: 8, 16 or 32 (the kernel's LANES)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise CudaError(f"attention: head_dim {head_dim} outside 1..{MAX_HEAD_DIM}")
    return max(8, 1 << (ceil_div(head_dim, 8) - 1).bit_length())


def splits_per_cta_for(pairs: int, n_splits: int, sm_count: int) -> int:
    """Consecutive splits one CTA walks, for `pairs` (sequence, kv head) pairs of `n_splits`
    splits each: about TARGET_CTAS_PER_SM CTAs per SM, the runs of a pair as even as they can
    be (8 splits over 2 CTAs: 4 + 4, not 5 + 3)."""
    wanted = min(n_splits, max(1, pairs * n_splits // (TARGET_CTAS_PER_SM * sm_count)))
    return ceil_div(n_splits, ceil_div(n_splits, wanted))


@dataclass(frozen=True, slots=True)
class AttentionLaunch:
    decode: LaunchConfig
    n_splits: int  # 1: every context fits one partition, no partials and no combine
    splits_per_cta: int  # consecutive splits a CTA walks: grid z = ceil(n_splits / this)


def attention_launch_config(
    num_seqs: int, n_heads: int, n_kv_heads: int, max_context: int, head_dim: int = 128,
    *, sm_count: int, splits_per_cta: int | None = None,
) -> AttentionLaunch:  # fmt: skip
    """grid (kv heads, sequences, runs of splits) for the decode kernel. The splits are fixed by
    max_context; `splits_per_cta` (None: splits_per_cta_for the batch's shape) only groups
    them, so any value gives the same bits."""
    if num_seqs < 1 or max_context < 1:
        raise CudaError(f"attention: {num_seqs} sequences, max context {max_context}")
    if n_heads % n_kv_heads or n_heads // n_kv_heads > MAX_GROUP:
        raise CudaError(f"attention: {n_heads} heads over {n_kv_heads} kv heads (group <= 8)")
    n_splits = ceil_div(max_context, PARTITION_TOKENS)
    if splits_per_cta is None:
        splits_per_cta = splits_per_cta_for(num_seqs * n_kv_heads, n_splits, sm_count)
    elif splits_per_cta < 1:
        raise CudaError(f"attention: {splits_per_cta} splits per CTA (want >= 1)")
    splits_per_cta = min(splits_per_cta, n_splits)
    lanes = row_lanes(head_dim)
    threads = min(MAX_ROW_GROUPS, ATTENTION_THREADS // lanes) * lanes
    grid = (n_kv_heads, num_seqs, ceil_div(n_splits, splits_per_cta))
    return AttentionLaunch(LaunchConfig(grid, (threads, 1, 1)), n_splits, splits_per_cta)


class DecodeAttention:
    """out[b] = softmax(q[b] k^T / sqrt(d)) v over sequence b's cached context."""

    def __init__(
        self, n_heads: int, n_kv_heads: int, head_dim: int, block_size: int,
        cache_dtype: torch.dtype,
    ) -> None:  # fmt: skip
        lanes = row_lanes(head_dim)
        if cache_dtype not in CACHE_DTYPES:
            raise CudaError(f"attention: KV cache dtype {cache_dtype} (float32 or float16)")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.block_size, self.cache_dtype = block_size, cache_dtype
        self.scale = head_dim**-0.5
        # None: the launcher picks per batch (splits_per_cta_for); tests and benchmarks pin it.
        self.splits_per_cta: int | None = None
        self._sm_count: int | None = None
        name = f"attention_decode_{CACHE_DTYPES[cache_dtype]}_l{lanes}"
        self._decode = launch_site("attention.cu", name, _DECODE_ARGS)
        # One ticket counter per (sequence, kv head), zero between launches: the kernel's last
        # CTA resets its own. Grown outside graph capture (the eager warm-up of a bucket runs
        # first), so a captured graph keeps the address it saw.
        self._counters: torch.Tensor | None = None

    def _ticket_counters(self, num_seqs: int, device: torch.device) -> torch.Tensor:
        needed = num_seqs * self.n_kv_heads
        if self._counters is None or self._counters.numel() < needed:
            self._counters = torch.zeros(max(needed, 128 * self.n_kv_heads), dtype=torch.int32,
                                         device=device)  # fmt: skip
        return self._counters

    def __call__(
        self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        block_tables: torch.Tensor, context_lens: torch.Tensor, max_context: int,
    ) -> torch.Tensor:  # fmt: skip
        """q rows hold the query heads first (a fused qkv row will do); out rows [heads * dim].
        `max_context` (host int) bounds every context_lens entry: it sizes the split grid."""
        num_seqs = q.shape[0]
        if self._sm_count is None:
            self._sm_count = multiprocessor_count()
        launch = attention_launch_config(
            num_seqs, self.n_heads, self.n_kv_heads, max_context, self.head_dim,
            sm_count=self._sm_count, splits_per_cta=self.splits_per_cta,
        )  # fmt: skip
        width = self.n_heads * self.head_dim
        if q.shape[1] < width or out.shape[0] != num_seqs or out.shape[1] < width:
            raise CudaError(f"attention: q {tuple(q.shape)} / out {tuple(out.shape)} mismatch")
        if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
            raise CudaError("attention: block_tables and context_lens need one row per sequence")
        if block_tables.shape[1] * self.block_size < max_context:
            raise CudaError(f"attention: block tables too narrow for {max_context} tokens")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            expected = (self.block_size, self.n_kv_heads, self.head_dim)
            if tuple(cache.shape[1:]) != expected or not cache.is_contiguous():
                raise CudaError(f"attention: {name} {tuple(cache.shape)}, expected [N, {expected}]")
        partial_out = partial_ml = counters = None
        if launch.n_splits > 1:
            counters = self._ticket_counters(num_seqs, q.device)
            parts = num_seqs * self.n_heads * launch.n_splits
            partial_out = torch.empty(parts * self.head_dim, dtype=torch.float32, device=q.device)
            partial_ml = torch.empty(parts * 2, dtype=torch.float32, device=q.device)
        self._decode.launch(
            launch.decode,
            pointer(out, "attention out", torch.float32),
            row_stride(out, "attention out"),
            pointer(q, "attention q", torch.float32),
            row_stride(q, "attention q"),
            pointer(k_cache, "attention k_cache", self.cache_dtype, align=2),
            pointer(v_cache, "attention v_cache", self.cache_dtype, align=2),
            pointer(block_tables, "attention block_tables", torch.int32),
            row_stride(block_tables, "attention block_tables"),
            pointer(context_lens, "attention context_lens", torch.int64, align=8),
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.block_size,
            self.scale,
            launch.n_splits,
            launch.splits_per_cta,
            pointer(partial_out, "attention partial_out", torch.float32, optional=True),
            pointer(partial_ml, "attention partial_ml", torch.float32, optional=True),
            pointer(counters, "attention counters", torch.int32, optional=True),
        )
        return out
