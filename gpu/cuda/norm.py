"""RMSNorm (gpu/kernels/norm.cu), optionally fused with the residual add before it."""

from __future__ import annotations

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride

_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "ptr", "i32", "ptr", "i32", "f32")


def rms_norm_launch_config(n_rows: int, hidden: int) -> LaunchConfig:
    """One CTA per row; one thread per element up to 1024 (whole warps), looping beyond."""
    if n_rows < 1 or hidden < 1:
        raise CudaError(f"rms_norm: {n_rows} rows of {hidden}")
    threads = min(1024, ceil_div(hidden, 32) * 32)
    return LaunchConfig((n_rows, 1, 1), (threads, 1, 1))


class RMSNorm:
    """out = h * rsqrt(mean(h^2) + eps) * weight with h = x, or h = x + residual written back
    into residual (the residual stream's add fused in)."""

    def __init__(self, hidden: int, eps: float) -> None:
        self.hidden, self.eps = hidden, eps
        self._site = launch_site("norm.cu", "rms_norm_f32", _ARG_KINDS)

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
        self._site.launch(
            rms_norm_launch_config(n_rows, self.hidden),
            pointer(out, "rms_norm out", torch.float32),
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
