"""The backend interface: weights in, a paged KV pool, and `forward(batch) -> logits`.

The engine, scheduler and KV bookkeeping are shared; a backend owns only device memory and
the math. The torch backend is the reference; the CUDA backend must match it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gpu.batch import ForwardBatch
from gpu.rope import check_rope_supported
from gpu.sampler import Sampler
from loader.config import ModelConfig, read_config
from loader.gguf_file import GGUFFile, open_gguf


@contextmanager
def model_source(
    gguf_file_or_path: GGUFFile | str | os.PathLike,
) -> Iterator[tuple[GGUFFile, ModelConfig]]:
    """The parsed file and its checked config, for a backend to load weights from.

    RoPE variants we do not compute are refused here, before minutes of loading. A file
    opened here is closed on exit (backends keep copies of the weights); a caller's own
    GGUFFile stays open.
    """
    opened_here = not isinstance(gguf_file_or_path, GGUFFile)
    file = open_gguf(gguf_file_or_path) if opened_here else gguf_file_or_path
    try:
        config = read_config(file)
        check_rope_supported(config.rope, config.name)
        yield file, config
    finally:
        if opened_here:
            file.close()


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
        """Run the model on a packed batch; returns float32 logits [len(logits_indices), vocab].

        The logits may be a view of the backend's own buffer (the CUDA graphs' output): valid
        until the next forward call; clone them to keep them longer."""

    def make_sampler(self, seed: int | None) -> Sampler:
        """The sampler for this backend's logits (torch ops on their device unless overridden);
        `seed` seeds the draws of rows without a seed of their own."""
        return Sampler(seed)
