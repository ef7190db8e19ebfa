"""Causal prefill attention over the paged KV cache (gpu/kernels/prefill_attention.cu).

Flash-attention style: each sequence's new queries are cut into tiles; one CTA per (tile, kv
head) holds the (token, query head) rows of the whole GQA group, so every K/V tile is read once
for the group, and walks the keys from 0 up to its last query's position with an online softmax
(no N x N matrix; keys past the diagonal are never loaded). The tile table ((sequence, first
query) per CTA, heaviest first) is built on the host: prefill is not graph-captured. fp16 caches
use tensor cores (q and p rounded to fp16, fp32 accumulation); fp32 caches, or
`tensor_cores=False`, use fp32 math on CUDA cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, pointer, row_stride
from gpu.cuda.rope_kv import CACHE_DTYPES

PREFILL_THREADS = 128  # THREADS in prefill_attention.cu: 4 warps
MMA_ROWS = 64  # (token, head) rows per CTA of the tensor-core kernels: 4 warps x 16
F32_ROWS = {64: 32, 128: 32, 256: 16}  # per padded head_dim: BM of the fp32 kernels
MMA_HEAD_DIMS = (64, 96, 128, 256)  # compiled head_dim paddings, smallest that fits is used
MAX_GROUP = 8
MAX_HEAD_DIM = 256
_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "ptr", "ptr", "ptr", "i32", "ptr", "ptr", "ptr",
              "i32", "i32", "i32", "i32", "i32", "f32")  # fmt: skip


def padded_head_dim(head_dim: int, tensor_cores: bool) -> int:
    """The compiled head_dim a kernel runs at (zero-padded): head_dim must be a multiple of 8."""
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise CudaError(
            f"prefill attention: head_dim {head_dim} (a multiple of 8 up to {MAX_HEAD_DIM})"
        )
    return min(d for d in (MMA_HEAD_DIMS if tensor_cores else F32_ROWS) if d >= head_dim)


@dataclass(frozen=True, slots=True)
class PrefillLaunch:
    """One call's grid and the tile table the kernel reads (blockIdx.x indexes `tiles`)."""

    config: LaunchConfig  # grid (tiles, kv heads)
    tile_tokens: int  # query tokens per tile (rows per CTA // group)
    tiles: tuple[tuple[int, int], ...]  # (sequence, first query index) per CTA, heaviest first


def prefill_attention_launch_config(
    query_lens: list[int], context_lens: list[int], n_heads: int, n_kv_heads: int,
    head_dim: int, tensor_cores: bool = True,
) -> PrefillLaunch:  # fmt: skip
    """Tiles of `rows // group` query tokens per sequence, one CTA per (tile, kv head).

    Tiles are ordered by the number of keys they read, most first, so the long diagonal tiles
    start early and the short ones fill in behind them; ties keep (sequence, query) order."""
    if len(query_lens) != len(context_lens) or not query_lens:
        raise CudaError(
            f"prefill attention: {len(query_lens)} query lengths, {len(context_lens)} contexts"
        )
    if n_kv_heads < 1 or n_heads % n_kv_heads or n_heads // n_kv_heads > MAX_GROUP:
        raise CudaError(
            f"prefill attention: {n_heads} heads over {n_kv_heads} kv heads (group <= 8)"
        )
    rows = MMA_ROWS if tensor_cores else F32_ROWS[padded_head_dim(head_dim, tensor_cores)]
    tile_tokens = rows // (n_heads // n_kv_heads)
    work: list[tuple[int, int, int]] = []  # (keys read, sequence, first query)
    for seq, (query_len, context) in enumerate(zip(query_lens, context_lens, strict=True)):
        if query_len < 0 or context < query_len:
            raise CudaError(
                f"prefill attention: sequence {seq} has {query_len} queries, context {context}"
            )
        for first in range(0, query_len, tile_tokens):
            last = min(first + tile_tokens, query_len) - 1
            work.append((context - query_len + last + 1, seq, first))
    if not work:
        raise CudaError("prefill attention: no query tokens")
    work.sort(key=lambda w: (-w[0], w[1], w[2]))
    config = LaunchConfig((len(work), n_kv_heads, 1), (PREFILL_THREADS, 1, 1))
    return PrefillLaunch(config, tile_tokens, tuple((seq, first) for _, seq, first in work))


class PrefillAttention:
    """out[t] = softmax(q[t] k^T / sqrt(d)) v over keys 0 .. position(t) of t's sequence."""

    def __init__(
        self, n_heads: int, n_kv_heads: int, head_dim: int, block_size: int,
        cache_dtype: torch.dtype = torch.float16, tensor_cores: bool | None = None,
    ) -> None:  # fmt: skip
        """`tensor_cores` defaults to True for an fp16 cache; an fp32 cache needs CUDA cores."""
        if cache_dtype not in CACHE_DTYPES:
            raise CudaError(f"prefill attention: KV cache dtype {cache_dtype} (float32 or float16)")
        if tensor_cores is None:
            tensor_cores = cache_dtype == torch.float16
        if tensor_cores and cache_dtype != torch.float16:
            raise CudaError("prefill attention: tensor cores need an fp16 KV cache")
        padded = padded_head_dim(head_dim, tensor_cores)
        if n_kv_heads < 1 or n_heads % n_kv_heads or n_heads // n_kv_heads > MAX_GROUP:
            raise CudaError(
                f"prefill attention: {n_heads} heads over {n_kv_heads} kv heads (group <= 8)"
            )
        if block_size < 1:
            raise CudaError(f"prefill attention: block size {block_size}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.block_size, self.cache_dtype, self.tensor_cores = block_size, cache_dtype, tensor_cores
        self.scale = head_dim**-0.5
        if tensor_cores:
            name = f"prefill_attention_mma_d{padded}"
        else:
            name = f"prefill_attention_f32_{CACHE_DTYPES[cache_dtype]}_d{padded}"
        self._kernel = launch_site("prefill_attention.cu", name, _ARG_KINDS)
        # The layers of one forward share a batch: its tile table is built and copied once.
        self._tiles_key: tuple | None = None
        self._launch: PrefillLaunch | None = None
        self._tiles: torch.Tensor | None = None

    def _tile_table(
        self, query_lens: list[int], context_lens: list[int], device: torch.device
    ) -> tuple[PrefillLaunch, torch.Tensor]:
        key = (tuple(query_lens), tuple(context_lens), device)
        if key != self._tiles_key:
            launch = prefill_attention_launch_config(
                query_lens, context_lens, self.n_heads, self.n_kv_heads, self.head_dim,
                self.tensor_cores,
            )  # fmt: skip
            flat = torch.tensor(launch.tiles, dtype=torch.int32).reshape(-1)
            # Pinned + non_blocking: no host-device sync (a pageable copy would wait for the GPU).
            self._tiles = flat.pin_memory().to(device, non_blocking=True)
            self._launch, self._tiles_key = launch, key
        return self._launch, self._tiles

    def __call__(
        self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
        query_lens: list[int], context_lens_host: list[int],
    ) -> torch.Tensor:  # fmt: skip
        """q [T, >= heads * dim] float32 (a fused qkv row will do), sequences packed at
        `query_start` (int64 [B + 1]); out [T, >= heads * dim]; K/V of the new tokens already in
        the cache. `query_lens` / `context_lens_host` are host copies of the batch's lengths."""
        num_seqs, num_tokens = len(query_lens), sum(query_lens)
        width = self.n_heads * self.head_dim
        if q.dim() != 2 or q.shape[0] != num_tokens or q.shape[1] < width:
            raise CudaError(f"prefill attention: q {tuple(q.shape)} for {num_tokens} x {width}")
        if out.dim() != 2 or out.shape[0] != num_tokens or out.shape[1] < width:
            raise CudaError(f"prefill attention: out {tuple(out.shape)} for {num_tokens} x {width}")
        if len(context_lens_host) != num_seqs or tuple(query_start.shape) != (num_seqs + 1,):
            raise CudaError("prefill attention: query_start needs B + 1 entries, context_lens B")
        if tuple(context_lens.shape) != (num_seqs,) or block_tables.dim() != 2:
            raise CudaError("prefill attention: context_lens [B] and block_tables [B, width]")
        if block_tables.shape[0] != num_seqs:
            raise CudaError("prefill attention: block_tables needs one row per sequence")
        longest = max(context_lens_host, default=0)
        if block_tables.shape[1] * self.block_size < longest:
            raise CudaError(f"prefill attention: block tables too narrow for {longest} tokens")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            expected = (self.block_size, self.n_kv_heads, self.head_dim)
            if tuple(cache.shape[1:]) != expected or not cache.is_contiguous():
                raise CudaError(
                    f"prefill attention: {name} {tuple(cache.shape)}, expected [N, {expected}]"
                )
        launch, tiles = self._tile_table(query_lens, context_lens_host, q.device)
        self._kernel.launch(
            launch.config,
            pointer(out, "prefill attention out", torch.float32, align=16),
            row_stride(out, "prefill attention out", multiple=4),
            pointer(q, "prefill attention q", torch.float32, align=8),
            row_stride(q, "prefill attention q", multiple=2),
            pointer(k_cache, "prefill attention k_cache", self.cache_dtype, align=16),
            pointer(v_cache, "prefill attention v_cache", self.cache_dtype, align=16),
            pointer(block_tables, "prefill attention block_tables", torch.int32),
            row_stride(block_tables, "prefill attention block_tables"),
            pointer(query_start, "prefill attention query_start", torch.int64, align=8),
            pointer(context_lens, "prefill attention context_lens", torch.int64, align=8),
            tiles.data_ptr(),
            launch.tile_tokens,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.block_size,
            self.scale,
        )
        return out
