"""The backend interface: weights in, a paged KV pool, `forward(batch) -> logits`, and the
sampler of those logits (`TokenSampler`, the protocol every backend's sampler satisfies).

The engine, scheduler and KV bookkeeping are shared; a backend owns only device memory and
the math. The torch backend is the reference; the CUDA backend must match it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from gpu.batch import DeviceUploader, ForwardBatch
from gpu.request import SamplingParams, TokenLogprobs
from gpu.rope import check_rope_supported
from jobs.limits import SAMPLING_BOUNDS
from loader.config import ModelConfig, read_config
from loader.gguf_file import GGUFFile, open_gguf


class SamplingBatchError(ValueError):
    """Logits and sampling rows that do not go together: a caller's bug, not a user's input."""


@dataclass(slots=True)
class SamplingRow:
    """One sequence's row of the logits: its parameters, its tokens so far, and the request it
    belongs to (the key of its random state in the sampler: required when `params.seed` is set
    on the torch sampler, whose seeded draws go on from one step to the next)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    request_id: str | None = None


@dataclass(slots=True, frozen=True)
class TokenMask:
    """The tokens grammar-constrained rows may sample next: `bits` [C, words] int32 on the host,
    one bit per token (bit `t % 32` of word `t // 32`, set = allowed; structured/matcher.py
    fills it), its row k for the batch's row `rows[k]` (ascending). Rows not named are
    unconstrained: no mask work for them. The sampler uploads `bits` in one copy and applies it
    before penalties, top-k and top-p; `bits` must stay untouched until the call's result is
    read (the engine alternates two buffers)."""

    bits: torch.Tensor
    rows: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class SampledToken:
    """The chosen token of one row; `logprobs` is set when the row asked for them."""

    token_id: int
    logprobs: TokenLogprobs | None = None


class PendingTokens:
    """One sampling call's tokens, chosen on the device and not read yet.

    `ids` ([B] int64 on the logits' device) can feed the next forward pass before the host has
    seen them; `result()` waits for the device and reads them (and any requested logprobs),
    once. The engine launches step t+1 from step t's `ids`, then reads step t's result.
    """

    __slots__ = ("ids", "_read", "_result")

    def __init__(self, ids: torch.Tensor, read: Callable[[], list[SampledToken]]) -> None:
        self.ids = ids
        self._read = read
        self._result: list[SampledToken] | None = None

    def result(self) -> list[SampledToken]:
        if self._result is None:
            self._result = self._read()
            self._read = None
        return self._result


@runtime_checkable
class TokenSampler(Protocol):
    """What the engine needs of a backend's sampler: choose one token per row of the logits on
    their device, read them later (overlapped decode), and own each request's random state,
    released when the request leaves the engine."""

    def launch(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> PendingTokens:
        """Choose the tokens (and requested logprobs) on the device without reading them;
        `mask` leaves the rows it names only their allowed tokens."""
        ...

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """`launch(...).result()`."""
        ...

    def release(self, request_id: str) -> None:
        """Forget the random state of a request that has finished (nothing if it had none)."""
        ...


def check_sampling_batch(
    logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
) -> None:
    """The checks every sampler makes: one [B, V] row of logits per sampling row, top-n
    logprobs within the engine's bound, and a mask that covers the vocabulary and names rows of
    the batch in order."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise SamplingBatchError(
            f"logits of shape {tuple(logits.shape)} do not match {len(rows)} rows"
        )
    if mask is not None:
        words = (logits.shape[1] + 31) // 32
        if mask.bits.dtype != torch.int32 or tuple(mask.bits.shape) != (len(mask.rows), words):
            raise SamplingBatchError(
                f"token mask of {mask.bits.dtype} {tuple(mask.bits.shape)} for {len(mask.rows)} "
                f"rows of {logits.shape[1]} tokens: want int32 ({len(mask.rows)}, {words})"
            )
        if list(mask.rows) != sorted(set(mask.rows)) or (
            mask.rows and not 0 <= mask.rows[0] <= mask.rows[-1] < len(rows)
        ):
            raise SamplingBatchError(f"token mask rows {list(mask.rows)[:8]} are not ascending "
                                     f"rows of a batch of {len(rows)}")
    bound = SAMPLING_BOUNDS["logprobs"]
    for i, row in enumerate(rows):
        if row.params.logprobs is not None and not bound.contains(row.params.logprobs):
            raise SamplingBatchError(
                f"row {i} asks for {row.params.logprobs} logprobs; the bound is "
                f"{bound.describe()}"
            )


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

    @abstractmethod
    def make_sampler(self, seed: int | None) -> TokenSampler:
        """The sampler for this backend's logits; `seed` seeds the draws of rows without a seed
        of their own."""

    def prepare_decode(self, max_seqs: int, max_context: int,
                       progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
        """Build ahead of time what decode steps of up to `max_seqs` sequences and
        `max_context` tokens would otherwise build on first use (the CUDA backend's graphs);
        returns how many were built. Nothing to build by default."""
        return 0

    def uploader(self) -> DeviceUploader | None:
        """How the engine's packed batches reach the device: None on the CPU (the tensors are
        used in place), the driver's copy and events on a GPU."""
        if self.device.type != "cuda":
            return None
        from gpu.cuda.driver import DriverUploader

        return DriverUploader()
