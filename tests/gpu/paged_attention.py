"""Shared by the decode and prefill attention tests: a paged KV cache of random blocks and the
float64 attention reference over it."""

from __future__ import annotations

import torch


def paged_cache(n_kv_heads, head_dim, block_size, context_lens, dtype, extra_columns=0,
                device="cuda"):  # fmt: skip
    """Random K/V in shuffled blocks; each sequence's table padded with -1 like the engine's.
    With `extra_columns` the tables are a column slice of a wider tensor (row stride != width)."""
    blocks_needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + 3
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    order = torch.randperm(num_blocks).tolist()
    width = max(blocks_needed) + 2
    tables = torch.full((len(context_lens), width + extra_columns), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    return k_cache, v_cache, tables.to(device)[:, :width]


def attention_reference(q, k_cache, v_cache, block_tables, query_lens, context_lens, n_heads):
    """float64 causal attention of each sequence's queries (packed rows of q, the last
    query_lens[i] positions of its context) over its gathered cache; decode is query_len 1."""
    block_size, n_kv_heads, head_dim = k_cache.shape[1:]
    group = n_heads // n_kv_heads
    outs, start = [], 0
    for i, (query_len, context) in enumerate(zip(query_lens, context_lens, strict=True)):
        blocks = block_tables[i, : -(-context // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:context].double().repeat_interleave(group, dim=1)
        values = v_cache[blocks].flatten(0, 1)[:context].double().repeat_interleave(group, dim=1)
        queries = q[start : start + query_len, : n_heads * head_dim].double()
        queries = queries.view(query_len, n_heads, head_dim).transpose(0, 1)  # [heads, n, d]
        scores = queries @ keys.permute(1, 2, 0) / head_dim**0.5  # [heads, n, context]
        query_pos = torch.arange(context - query_len, context, device=q.device)
        masked = torch.arange(context, device=q.device)[None, :] > query_pos[:, None]
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
        outs.append((probs @ values.transpose(0, 1)).transpose(0, 1).reshape(query_len, -1))
        start += query_len
    return torch.cat(outs)
