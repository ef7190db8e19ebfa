"""Rotary position embeddings as llama.cpp applies them to GGUF models.

Two orderings of the rotated pairs. "Normal" rotates adjacent pairs (x[2i], x[2i+1]): it is
what GGUF `llama` files need, because llama.cpp's converter permuted their Q/K rows so that
HF's halves layout became interleaved (transformers undoes that permutation when it loads a
GGUF; we keep the file's rows and rotate adjacent pairs, which is the same math). "NeoX"
rotates halves (x[i], x[i + dim/2]), HF's own layout, which `qwen2` and `phi3` files keep.
Only the first `rope.dim` features of a head rotate (partial rotary); the rest pass through.
"""

from __future__ import annotations

import torch

from jobs.errors import OrcdError
from loader.config import RopeConfig


class RopeNotSupportedError(OrcdError):
    """A model's RoPE scaling is one orcd does not compute (yet)."""


def check_rope_supported(rope: RopeConfig, model_name: str = "model") -> None:
    """Refuse, before any weight is loaded, the RoPE variants we do not implement."""
    if rope.long_factors_tensor is not None:
        # Phi-3 128k's LongRoPE switches between short and long factors by sequence length
        # and rescales attention; nothing in orcd computes it.
        raise RopeNotSupportedError(
            f"{model_name}: LongRoPE (tensor {rope.long_factors_tensor!r}) is not supported"
        )
    if rope.scaling_type == "yarn":
        # YaRN needs llama.cpp's ramp between interpolated and extrapolated frequencies plus
        # the attention factor; no supported model we test ships it, so it is refused.
        raise RopeNotSupportedError(f"{model_name}: yarn rope scaling not supported yet")


class Rotary:
    """Per-pair inverse frequencies of one model; `cos_sin` per batch, `apply` per Q/K tensor."""

    def __init__(
        self,
        rope: RopeConfig,
        freq_factors: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        check_rope_supported(rope)
        self.dim = rope.dim
        self.neox = rope.neox
        # Same float32 arithmetic as HF's default rotary init: base ** (2i / dim), inverted.
        exponents = torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim
        inv_freq = 1.0 / (rope.base**exponents)
        if freq_factors is not None:
            # Llama 3.1's `rope_freqs`: llama.cpp divides each pair's angle by its factor.
            inv_freq = inv_freq / freq_factors.float().cpu()
        if rope.scaling_type == "linear":
            # Linear scaling is positions / factor; dividing the frequencies is the same.
            inv_freq = inv_freq / rope.scaling_factor
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin of every token's angles, [T, 1, dim/2] (broadcast over heads)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (any dtype; computed in float32, returned in x's)."""
        rot = x[..., : self.dim].float()
        if self.neox:
            half = self.dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        rotated = rotated.to(x.dtype)
        if self.dim == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., self.dim :]), dim=-1)
