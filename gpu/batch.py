"""What one forward call sees: packed tokens of several sequences plus where their KV lives.

The engine packs it from the scheduler's plan; every backend consumes exactly this. Sequences
are packed one after another (prefill chunks and single decode tokens mixed), so
`query_start[i]:query_start[i+1]` are sequence i's new tokens, at positions
`context_lens[i] - query_lens[i] ... context_lens[i] - 1`. Their K/V are written to `slot_mapping` (block * block_size + offset)
before attention reads the sequence's whole context through its block table.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Fence(Protocol):
    """A marker on the device's stream: `record()` places it, `synchronize()` waits for it."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class DeviceUploader(Protocol):
    """How packed bytes reach device memory, supplied by the backend (`Backend.uploader()`):
    `copy` queues a copy from pinned host memory on the device's current stream, `fence()`
    makes a reusable marker to know when that copy has run."""

    def copy(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None: ...

    def fence(self) -> Fence: ...


@dataclass(slots=True)
class ForwardBatch:
    """Host-built index tensors for one step (int64 on the backend's device unless noted)."""

    token_ids: torch.Tensor  # [T] new tokens, packed
    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] KV slot each new token's K/V is written to
    query_start: torch.Tensor  # [B + 1] offsets of each sequence's tokens in the packed batch
    context_lens: torch.Tensor  # [B] tokens in KV after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32 block ids, -1 past the end
    logits_indices: torch.Tensor  # [L] rows of the packed batch whose logits are wanted
    query_lens: list[int]  # host copies, for backends that loop over sequences
    context_lens_host: list[int]
    # Engine-only, for a step launched ahead: [2P] int64, the packed places of its P pending
    # tokens then the rows of the previous step's sampled ids they take (gpu/engine.py).
    splice: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class BatchPacker:
    """Builds ForwardBatches from host lists with one host-to-device copy per step.

    Seven small tensors, each pinned and copied on its own, cost ~175 us of host time per step
    (and pinning fresh memory can wait for the GPU); here every field is written into one pinned
    staging buffer and copied up at once into a device buffer whose field views are made once
    per batch shape. Two (staging, device) pairs are used in turn: a staging buffer is rewritten
    only once its last copy has run, and a device buffer is overwritten by a copy queued on the
    stream after the kernels that read it. So a ForwardBatch stays valid for one more step: use
    it before packing the next-but-one. On the CPU every batch gets fresh host tensors.
    """

    def __init__(self, device: torch.device, uploader: DeviceUploader | None = None) -> None:
        self.device = device
        self._on_gpu = device.type == "cuda"
        if self._on_gpu and uploader is None:
            raise ValueError(f"a BatchPacker on {device} needs the backend's uploader")
        self._slots = [_PackSlot(uploader), _PackSlot(uploader)]
        self._turn = 0

    def pack(
        self,
        token_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        logits_indices: list[int],
        splice: list[int] = (),
    ) -> ForwardBatch:
        """One step's batch; block table rows are padded with -1 to the widest. `splice`
        rides in the same copy (ForwardBatch.splice)."""
        n_seqs = len(query_lens)
        width = max(map(len, block_tables), default=0)
        shape = (len(token_ids), n_seqs, len(logits_indices), width, len(splice))
        self._turn ^= 1
        slot = self._slots[self._turn]
        views = slot.prepare(shape, self.device) if self._on_gpu else _PackSlot.fresh(shape)
        words, tables, fields = views
        words[:] = [*token_ids, *positions, *slot_mapping, 0, *itertools.accumulate(query_lens),
                    *context_lens, *logits_indices, *splice]  # fmt: skip
        tables.fill(-1)
        for row, table in zip(tables, block_tables, strict=True):
            row[: len(table)] = table
        if self._on_gpu:
            slot.upload()
        *fields, spliced = fields
        return ForwardBatch(*fields, query_lens=list(query_lens),
                            context_lens_host=list(context_lens),
                            splice=spliced if splice else None)  # fmt: skip


class _PackSlot:
    """One pinned staging buffer, its device twin, and their views for the last batch shape."""

    def __init__(self, uploader: DeviceUploader | None) -> None:
        self.uploader = uploader
        self.host: torch.Tensor | None = None
        self.dev: torch.Tensor | None = None
        self.copied: Fence | None = None  # recorded after the last upload
        self.nbytes = 0
        self._host_ptr = self._dev_ptr = 0
        self._shape: tuple[int, ...] | None = None
        self._views: tuple | None = None

    @staticmethod
    def layout(shape: tuple[int, int, int, int, int]) -> tuple[int, int]:
        """(int64 words, total bytes): tokens, positions, slots, query_start, context, logits
        rows, splice as int64, then the [seqs, width] int32 block tables."""
        n_tokens, n_seqs, n_logits, width, n_splice = shape
        words = 3 * n_tokens + 2 * n_seqs + 1 + n_logits + n_splice
        return words, 8 * words + 4 * n_seqs * width

    @staticmethod
    def views(buffer: torch.Tensor, shape: tuple[int, int, int, int, int]) -> tuple:
        """The ForwardBatch tensor fields (token_ids .. logits_indices, then splice) as views
        of `buffer`."""
        n_tokens, n_seqs, n_logits, width, n_splice = shape
        n_words, nbytes = _PackSlot.layout(shape)
        words = buffer[: 8 * n_words].view(torch.int64)
        sizes = (n_tokens, n_tokens, n_tokens, n_seqs + 1, n_seqs, n_logits, n_splice)
        fields, start = [], 0
        for size in sizes:
            fields.append(words[start : start + size])
            start += size
        tables = buffer[8 * n_words : nbytes].view(torch.int32).view(n_seqs, width)
        return (*fields[:5], tables, fields[5], fields[6])

    @staticmethod
    def fresh(shape: tuple[int, int, int, int, int]) -> tuple:
        n_words, nbytes = _PackSlot.layout(shape)
        host = torch.empty(nbytes, dtype=torch.uint8)
        return _PackSlot._numpy_views(host, shape) + (_PackSlot.views(host, shape),)

    @staticmethod
    def _numpy_views(host: torch.Tensor, shape: tuple[int, int, int, int, int]) -> tuple:
        n_words, nbytes = _PackSlot.layout(shape)
        array = host.numpy()
        words = array[: 8 * n_words].view(np.int64)
        tables = array[8 * n_words : nbytes].view(np.int32).reshape(shape[1], shape[3])
        return words, tables

    def prepare(self, shape: tuple[int, int, int, int, int], device: torch.device) -> tuple:
        """(int64 numpy words, int32 numpy tables, device fields) for `shape`, once the last
        upload from this slot's staging buffer has run."""
        if self.copied is not None:
            self.copied.synchronize()
        if shape != self._shape:
            _, nbytes = self.layout(shape)
            if nbytes > (0 if self.host is None else self.host.numel()):
                capacity = max(nbytes, 2 * (0 if self.host is None else self.host.numel()), 4096)
                self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
                self.dev = torch.empty(capacity, dtype=torch.uint8, device=device)
                self._host_ptr, self._dev_ptr = self.host.data_ptr(), self.dev.data_ptr()
                self.copied = self.uploader.fence()
            self.nbytes, self._shape = nbytes, shape
            self._views = (*self._numpy_views(self.host, shape), self.views(self.dev, shape))
        return self._views

    def upload(self) -> None:
        """One copy and one fence (the CUDA backend's driver calls: torch's copy_ and Event cost
        ~4x their host time)."""
        self.uploader.copy(self._dev_ptr, self._host_ptr, self.nbytes)
        self.copied.record()
