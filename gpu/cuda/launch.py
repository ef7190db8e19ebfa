"""Launch geometry shared by every kernel wrapper: a LaunchConfig and the checks on its limits.

Each wrapper module computes its kernel's config in one pure function (no GPU needed), so the
grid arithmetic for ragged shapes is unit-tested in CI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu.cuda.errors import CudaError

# CUDA's limits on grid and block dimensions (all current architectures).
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
STATIC_SHARED_LIMIT = 48 * 1024  # more needs cuFuncSetAttribute on the kernel (LaunchSite does)
OPT_IN_SHARED_LIMIT = 227 * 1024  # per CTA on sm_90 (sm_80: 163 KiB, sm_89: 99 KiB)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# (grid, block, shared_mem) already checked: a step builds hundreds of configs, nearly all
# seen before, and the check costs a few µs of host time each (bench/NOTES.md, session 11).
_CHECKED: set[tuple] = set()


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Grid, block and dynamic shared memory of one launch (x, y, z)."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0

    def __post_init__(self) -> None:
        key = (self.grid, self.block, self.shared_mem)
        if key in _CHECKED:
            return
        for what, dims, limits in (("grid", self.grid, MAX_GRID), ("block", self.block, MAX_BLOCK)):
            if len(dims) != 3 or any(d < 1 or d > lim for d, lim in zip(dims, limits, strict=True)):
                raise CudaError(f"{what} {dims} is outside CUDA's limits {limits} (each >= 1)")
        threads = self.block[0] * self.block[1] * self.block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise CudaError(f"block {self.block} has {threads} threads, more than 1024")
        if not 0 <= self.shared_mem <= OPT_IN_SHARED_LIMIT:
            raise CudaError(f"{self.shared_mem} bytes of dynamic shared memory: over 227 KiB")
        if len(_CHECKED) < 65536:
            _CHECKED.add(key)


def pointer(
    tensor: torch.Tensor | None,
    name: str,
    dtype: torch.dtype,
    align: int = 4,
    optional: bool = False,
) -> int:
    """`tensor.data_ptr()` after checking that a kernel may read it as `dtype` on the GPU,
    16-byte loads included where `align` says so; 0 for an optional tensor left out."""
    if tensor is None:
        if optional:
            return 0
        raise CudaError(f"{name}: a tensor is required")
    if tensor.dtype != dtype:
        raise CudaError(f"{name}: expected {dtype}, got {tensor.dtype}")
    if not tensor.is_cuda:
        raise CudaError(f"{name}: expected a CUDA tensor, got one on {tensor.device}")
    if tensor.dim() and tensor.stride(-1) != 1:
        raise CudaError(
            f"{name}: innermost dimension must be contiguous (stride {tensor.stride()})"
        )
    address = tensor.data_ptr()
    if address % align:
        raise CudaError(f"{name}: data at {address:#x} is not {align}-byte aligned")
    return address


def row_stride(tensor: torch.Tensor, name: str, multiple: int = 1) -> int:
    """Elements between rows of a 2-D tensor; kernels doing 16-byte row loads need a multiple."""
    if tensor.dim() != 2:
        raise CudaError(f"{name}: expected a 2-D tensor, got shape {tuple(tensor.shape)}")
    stride = tensor.stride(0)
    if tensor.shape[0] > 1 and stride % multiple:
        raise CudaError(f"{name}: row stride {stride} is not a multiple of {multiple} elements")
    return stride
