"""RMSNorm (gpu/kernels/norm.cu), optionally fused with the residual add before it."""

from __future__ import annotations

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride

_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "ptr", "i32", "ptr", "i32", "f32")
NORM_VEC = 4  # norm.cu: float4s per thread at most in rms_norm_f32_vec
VEC_MAX_HIDDEN = 4 * NORM_VEC * 1024


def rms_norm_launch_config(n_rows: int, hidden: int, vector: bool = False) -> LaunchConfig:
    """One CTA per row. Scalar kernel: a thread per element up to 1024 (whole warps), looping
    beyond. Vector kernel: whole warps holding up to NORM_VEC float4s each (4096 wide: 256
    threads of 4)."""
    if n_rows < 1 or hidden < 1:
        raise CudaError(f"rms_norm: {n_rows} rows of {hidden}")
    if not vector:
        return LaunchConfig((n_rows, 1, 1), (min(1024, ceil_div(hidden, 32) * 32), 1, 1))
    if hidden % 4 or hidden > VEC_MAX_HIDDEN:
        raise CudaError(f"rms_norm: the vector kernel takes hidden % 4 == 0 and <= "
                        f"{VEC_MAX_HIDDEN}, not {hidden}")  # fmt: skip
    threads = ceil_div(ceil_div(hidden // 4, NORM_VEC), 32) * 32
    return LaunchConfig((n_rows, 1, 1), (threads, 1, 1))


def _vector_ok(hidden: int, *tensors: torch.Tensor | None) -> bool:
    """Whether rms_norm_f32_vec can read these rows: float4-aligned starts and strides."""
    if hidden % 4 or hidden > VEC_MAX_HIDDEN:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16 or (t.dim() == 2 and t.shape[0] > 1 and t.stride(0) % 4):
            return False
    return True


class RMSNorm:
    """out = h * rsqrt(mean(h^2) + eps) * weight with h = x, or h = x + residual written back
    into residual (the residual stream's add fused in); out float32, or fp16 (rounded once, as
    the tensor-core matmul takes its input). The vector kernel runs wherever the rows
    are float4-aligned (every buffer the backends make), the scalar one otherwise."""

    def __init__(self, hidden: int, eps: float) -> None:
        self.hidden, self.eps = hidden, eps
        self._sites = {
            (vector, half): launch_site(
                "norm.cu", f"rms_norm_f32{'_vec' if vector else ''}{'_half' if half else ''}",
                _ARG_KINDS,
            )
            for vector in (False, True) for half in (False, True)
        }  # fmt: skip

    def __call__(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_rows = x.shape[0]
        if out.shape[0] != n_rows or min(out.shape[1], x.shape[1]) < self.hidden:
            raise CudaError(f"rms_norm: out {tuple(out.shape)} / x {tuple(x.shape)} mismatch")
        if weight.numel() != self.hidden:
            raise CudaError(f"rms_norm: weight has {weight.numel()} values for {self.hidden}")
        if residual is not None and (residual.shape[0] != n_rows
                                     or residual.shape[1] < self.hidden):  # fmt: skip
            raise CudaError(f"rms_norm: residual {tuple(residual.shape)} does not match x")
        half = out.dtype == torch.float16  # fp16 rows for the tensor-core matmul
        vector = _vector_ok(self.hidden, out, x, weight, residual) and (
            not half or (out.data_ptr() % 16 == 0 and (out.shape[0] < 2 or out.stride(0) % 8 == 0))
        )
        self._sites[vector, half].launch(
            rms_norm_launch_config(n_rows, self.hidden, vector),
            pointer(out, "rms_norm out", out.dtype if half else torch.float32),
            row_stride(out, "rms_norm out"),
            pointer(x, "rms_norm x", torch.float32),
            row_stride(x, "rms_norm x"),
            pointer(residual, "rms_norm residual", torch.float32, optional=True),
            0 if residual is None else row_stride(residual, "rms_norm residual"),
            pointer(weight, "rms_norm weight", torch.float32),
            self.hidden,
            self.eps,
        )
        return out
