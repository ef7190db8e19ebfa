"""Weight-only int8 matrices for the torch backend's fastest CPU mode.

Decode on a CPU is memory-bound: every step reads every weight once. Per-output-row int8
(scale = row absmax / 127) halves the bytes of bfloat16, and torch's `_weight_int8pack_mm`
kernel multiplies bfloat16 activations by them without materialising a wider copy. Measured
on this workplace's 2-core EPYC (2026-11-25), SmolLM2-135M's 121 decode matmuls per step:
float32 33 ms, bfloat16 15 ms, int8 5.5 ms. Accuracy is that of 8-bit weights; float32 stays
the reference every test compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class Int8Weight:
    """A [out_features, in_features] matrix as int8 values and one bfloat16 scale per row."""

    values: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bfloat16 [N]

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        values = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values, scales.to(torch.bfloat16))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


# From this many rows of activations (a prefill chunk, a big batch) on, `linear` widens the
# int8 values to bfloat16 for the call and runs a bfloat16 matmul, scaling its output per row:
# `_weight_int8pack_mm` costs about M times a one-row product (a matrix-vector loop), while
# the widening costs about one and the bfloat16 matmul grows slowly with M. SmolLM2-135M's
# matrices on this 2-core CPU (2026-12-06, one thread): 16 rows 22 ms int8 vs 25 ms widened,
# 37 rows 51 vs 37, 128 rows 249 vs 102.
DEQUANT_ROWS = 32


def linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` for dense weights and for `Int8Weight` (bfloat16 activations and result)."""
    if not isinstance(weight, Int8Weight):
        return F.linear(x, weight, bias)
    x = x.to(torch.bfloat16)
    if x.shape[0] >= DEQUANT_ROWS:
        # int8 values are exact in bfloat16; the per-row scale applies to the output columns.
        out = F.linear(x, weight.values.to(torch.bfloat16)) * weight.scales
    else:
        out = torch._weight_int8pack_mm(x, weight.values, weight.scales)
    return out if bias is None else out + bias
