"""What one forward call sees: packed tokens of several sequences plus where their KV lives.

The scheduler builds this; every backend consumes exactly this. Sequences are packed one after
another (prefill chunks and single decode tokens mixed), so `query_start[i]:query_start[i+1]`
are sequence i's new tokens, at positions `context_lens[i] - query_lens[i] ...
context_lens[i] - 1`. Their K/V are written to `slot_mapping` (block * block_size + offset)
before attention reads the sequence's whole context through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

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
