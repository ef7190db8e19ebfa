"""RoPE on Q and K fused with the paged KV write (gpu/kernels/rope_kv.cu).

Same math as gpu/rope.py (normal = adjacent pairs, NeoX = halves, partial rotary), with the
angles computed on the device from the positions and the model's inverse frequencies.
"""

from __future__ import annotations

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride

CACHE_DTYPES = {torch.float32: "f32", torch.float16: "f16"}
_ARG_KINDS = ("ptr", "i32", "ptr", "ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32", "i32")


def rope_kv_launch_config(
    n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int
) -> LaunchConfig:
    """One CTA per (token, q/k/v head); a thread per rotated pair (half a head), whole warps."""
    if n_tokens < 1 or head_dim < 2:
        raise CudaError(f"rope_kv: {n_tokens} tokens of head_dim {head_dim}")
    threads = min(128, max(32, ceil_div(head_dim // 2, 32) * 32))
    return LaunchConfig((n_tokens, n_heads + 2 * n_kv_heads, 1), (threads, 1, 1))


class RopeKVWrite:
    """Rotate Q in place in the fused qkv rows; write rotated K and V to the caches."""

    def __init__(
        self, n_heads: int, n_kv_heads: int, head_dim: int, rot_dim: int, neox: bool,
        cache_dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if rot_dim % 2 or not 0 < rot_dim <= head_dim:
            raise CudaError(f"rope_kv: rotary dim {rot_dim} for head_dim {head_dim}")
        if cache_dtype not in CACHE_DTYPES:
            raise CudaError(f"rope_kv: KV cache dtype {cache_dtype} (float32 or float16)")
        self.n_heads, self.n_kv_heads, self.head_dim, self.rot_dim = (
            n_heads, n_kv_heads, head_dim, rot_dim,
        )  # fmt: skip
        self.cache_dtype = cache_dtype
        name = f"rope_kv_{'neox' if neox else 'normal'}_{CACHE_DTYPES[cache_dtype]}"
        self._site = launch_site("rope_kv.cu", name, _ARG_KINDS)

    def __call__(
        self, qkv: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> None:  # fmt: skip
        n_tokens = qkv.shape[0]
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        if (
            qkv.shape[1] < width
            or positions.shape[0] != n_tokens
            or slot_mapping.shape[0] != n_tokens
        ):
            raise CudaError(f"rope_kv: qkv {tuple(qkv.shape)} needs {width} columns per token")
        if inv_freq.numel() != self.rot_dim // 2:
            raise CudaError(
                f"rope_kv: {inv_freq.numel()} frequencies for rotary dim {self.rot_dim}"
            )
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.shape[-2:] != (self.n_kv_heads, self.head_dim) or not cache.is_contiguous():
                raise CudaError(f"rope_kv: {name} {tuple(cache.shape)} is not a contiguous pool")
        self._site.launch(
            rope_kv_launch_config(n_tokens, self.n_heads, self.n_kv_heads, self.head_dim),
            pointer(qkv, "rope_kv qkv", torch.float32),
            row_stride(qkv, "rope_kv qkv"),
            pointer(positions, "rope_kv positions", torch.int64, align=8),
            pointer(slot_mapping, "rope_kv slot_mapping", torch.int64, align=8),
            pointer(inv_freq, "rope_kv inv_freq", torch.float32),
            pointer(k_cache, "rope_kv k_cache", self.cache_dtype, align=2),
            pointer(v_cache, "rope_kv v_cache", self.cache_dtype, align=2),
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.rot_dim,
        )
