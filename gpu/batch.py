"""What one forward call sees: packed tokens of several sequences plus where their KV lives.

The scheduler builds this; every backend consumes exactly this. Sequences are packed one after
another (prefill chunks and single decode tokens mixed), so `query_start[i]:query_start[i+1]`
are sequence i's new tokens, at positions `context_lens[i] - query_lens[i] ...
context_lens[i] - 1`. Their K/V are written to `slot_mapping` (block * block_size + offset)
before attention reads the sequence's whole context through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    staging buffer (two, used in turn, each reused only once its last copy has run) and copied
    up at once, and the fields are views of that one device tensor. On the CPU the views are of
    the host buffer itself.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]
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
    ) -> ForwardBatch:
        """One step's batch; block table rows are padded with -1 to the widest."""
        n_tokens, n_seqs = len(token_ids), len(query_lens)
        width = max((len(t) for t in block_tables), default=0)
        query_start = np.zeros(n_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        sizes = (n_tokens, n_tokens, n_tokens, n_seqs + 1, n_seqs, len(logits_indices))
        n64 = sum(sizes)
        nbytes = 8 * n64 + 4 * n_seqs * width
        host = self._buffer(nbytes)
        words = host[: 8 * n64].numpy().view(np.int64)
        offsets = np.cumsum((0, *sizes))
        for values, start, end in zip(
            (token_ids, positions, slot_mapping, query_start, context_lens, logits_indices),
            offsets[:-1], offsets[1:], strict=True,
        ):  # fmt: skip
            words[start:end] = values
        tables = host[8 * n64 : nbytes].numpy().view(np.int32).reshape(n_seqs, width)
        tables.fill(-1)
        for row, table in zip(tables, block_tables, strict=True):
            row[: len(table)] = table
        packed = host[:nbytes]
        if self.device.type == "cuda":
            packed = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            packed.copy_(host[:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        fields = packed[: 8 * n64].view(torch.int64)
        views = [fields[start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        return ForwardBatch(
            token_ids=views[0], positions=views[1], slot_mapping=views[2],
            query_start=views[3], context_lens=views[4],
            block_tables=packed[8 * n64 : nbytes].view(torch.int32).view(n_seqs, width),
            logits_indices=views[5], query_lens=list(query_lens),
            context_lens_host=list(context_lens),
        )  # fmt: skip

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The next staging buffer, at least `nbytes`, once no copy from it is pending (on the
        CPU a fresh one: the batch's fields are views of it)."""
        if self.device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8)
        self._turn ^= 1
        pending = self._copied[self._turn]
        if pending is not None:
            pending.synchronize()
        if len(self._staging) < 2:
            self._staging = [self._new_buffer(4096), self._new_buffer(4096)]
        if self._staging[self._turn].numel() < nbytes:
            grown = max(nbytes, 2 * self._staging[self._turn].numel())
            self._staging[self._turn] = self._new_buffer(grown)
        return self._staging[self._turn]

    @staticmethod
    def _new_buffer(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
