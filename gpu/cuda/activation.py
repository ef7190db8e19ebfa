"""SwiGLU on a fused gate.up output (gpu/kernels/activation.cu): out = silu(gate) * up."""

from __future__ import annotations

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride

THREADS = 256
_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "i32")


def silu_mul_launch_config(n_tokens: int, ffn: int) -> LaunchConfig:
    """x covers the ffn features in blocks of THREADS (last one ragged), y the tokens."""
    if n_tokens < 1 or ffn < 1:
        raise CudaError(f"silu_mul: {n_tokens} tokens of {ffn} features")
    return LaunchConfig((ceil_div(ffn, THREADS), n_tokens, 1), (THREADS, 1, 1))


class SiluMul:
    """out = silu(gate) * up from a gate.up row: gate columns then up columns, or with
    `interleaved` (a gate.up matrix loaded for the matvec's SwiGLU epilogue) gate at 2i, up at
    2i + 1."""

    def __init__(self, ffn: int) -> None:
        self.ffn = ffn
        self._sites = {
            False: launch_site("activation.cu", "silu_mul_f32", _ARG_KINDS),
            True: launch_site("activation.cu", "silu_mul_interleaved_f32", _ARG_KINDS),
        }

    def __call__(
        self, out: torch.Tensor, gate_up: torch.Tensor, interleaved: bool = False
    ) -> torch.Tensor:
        n_tokens = gate_up.shape[0]
        if gate_up.shape[1] < 2 * self.ffn or out.shape[0] != n_tokens or out.shape[1] < self.ffn:
            raise CudaError(f"silu_mul: out {tuple(out.shape)} / gate_up {tuple(gate_up.shape)}")
        self._sites[interleaved].launch(
            silu_mul_launch_config(n_tokens, self.ffn),
            pointer(out, "silu_mul out", torch.float32),
            row_stride(out, "silu_mul out"),
            pointer(gate_up, "silu_mul gate_up", torch.float32, align=8 if interleaved else 4),
            row_stride(gate_up, "silu_mul gate_up", multiple=2 if interleaved else 1),
            self.ffn,
        )
        return out
