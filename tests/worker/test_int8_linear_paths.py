"""The int8 mode (`--dtype auto` on a CPU) multiplies small batches with the int8 kernel and
prefill-sized ones with the weight widened to bfloat16: both give the same product.

(Here rather than in tests/gpu/test_torch_backend.py, which this change leaves alone.)"""

from __future__ import annotations

import pytest
import torch

from gpu import int8_linear
from gpu.int8_linear import DEQUANT_ROWS, Int8Weight, linear


@pytest.mark.parametrize("rows", [1, DEQUANT_ROWS - 1, DEQUANT_ROWS, 100])
def test_both_paths_match_the_dequantised_product(monkeypatch, rows):
    torch.manual_seed(rows)
    weight = Int8Weight.quantize(torch.randn(96, 64) * 0.05)
    bias = torch.randn(96).bfloat16()
    x = torch.randn(rows, 64)
    restored = weight.values.float() * weight.scales.float()[:, None]
    expected = x.bfloat16().float() @ restored.T + bias.float()
    got = linear(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2)
    # The other path on the same input: the two agree to bfloat16 rounding.
    monkeypatch.setattr(int8_linear, "DEQUANT_ROWS", 1 if rows < DEQUANT_ROWS else 10**9)
    other = linear(x, weight, bias)
    assert torch.allclose(got.float(), other.float(), rtol=2e-2, atol=2e-2)
