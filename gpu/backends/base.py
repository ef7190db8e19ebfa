"""The backend interface: weights in, a paged KV pool, and `forward(batch) -> logits`.

The engine, scheduler and KV bookkeeping are shared; a backend owns only device memory and
the math. The torch backend is the reference; the CUDA backend must match it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from gpu.batch import ForwardBatch
from loader.config import ModelConfig


class Backend(ABC):
    """One model's weights and KV pool on one device."""

    name: str
    device: torch.device
    config: ModelConfig

    @abstractmethod
    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """Allocate the KV pool: per layer, K and V of [num_blocks, block_size, kv_heads, dim]."""

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes over all layers (K and V), to size the pool from free memory."""

    @abstractmethod
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model on a packed batch; returns float32 logits [len(logits_indices), vocab]."""
