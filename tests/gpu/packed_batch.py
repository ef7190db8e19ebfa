"""A ForwardBatch packed by hand for backend tests that drive `forward` without the engine."""

from __future__ import annotations

import torch

from gpu.batch import ForwardBatch


def packed_batch(seqs: list[tuple[int, list[int], int]], block_size: int, blocks_per_seq: int,
                 device: str = "cpu") -> ForwardBatch:  # fmt: skip
    """(sequence slot, new token ids, tokens already cached) per sequence, slot s owning blocks
    [s * blocks_per_seq, (s + 1) * blocks_per_seq) (unused table entries -1); logits of each
    sequence's rows, all of them."""
    token_ids, positions, slots, tables, context_lens, query_start = [], [], [], [], [], [0]
    for seq, new, cached in seqs:
        blocks = list(range(seq * blocks_per_seq, (seq + 1) * blocks_per_seq))
        for j, token in enumerate(new):
            pos = cached + j
            token_ids.append(token)
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        query_start.append(query_start[-1] + len(new))
        context_lens.append(cached + len(new))
        used = -(-context_lens[-1] // block_size)
        tables.append(blocks[:used] + [-1] * (blocks_per_seq - used))

    def tensor(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardBatch(
        token_ids=tensor(token_ids), positions=tensor(positions), slot_mapping=tensor(slots),
        query_start=tensor(query_start), context_lens=tensor(context_lens),
        block_tables=tensor(tables, torch.int32),
        logits_indices=tensor(list(range(len(token_ids)))),
        query_lens=[len(new) for _, new, _ in seqs], context_lens_host=context_lens,
    )  # fmt: skip
