"""Perplexity exactly as llama.cpp's `llama-perplexity` computes it, so the numbers compare.

The token stream is cut into non-overlapping chunks of n_ctx tokens (the tail that does not
fill a chunk is dropped). Each chunk is evaluated from an empty cache; when the model adds BOS,
the chunk's first token is replaced by BOS for the forward pass (the original token is still
the target). Only the second half of each chunk is scored: logits at positions
n_ctx/2 .. n_ctx-2 predict the tokens after them. The estimate is exp(mean NLL) and its error
is ppl * sqrt(var(NLL) / (count - 1)), as llama.cpp prints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gpu.backends.base import Backend
from gpu.batch import ForwardBatch
from gpu.request import RequestError


@dataclass(slots=True)
class PerplexityEstimate:
    """Running estimate after `chunks` chunks."""

    chunks: int
    total_chunks: int
    tokens_scored: int
    ppl: float
    error: float


def chunk_batch(tokens: list[int], block_size: int, device: torch.device) -> ForwardBatch:
    """One sequence occupying blocks 0..k-1 of the pool, logits wanted at every position."""
    n = len(tokens)

    def tensor(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    num_blocks = -(-n // block_size)
    return ForwardBatch(
        token_ids=tensor(tokens),
        positions=tensor(range(n)),
        slot_mapping=tensor(range(n)),
        query_start=tensor([0, n]),
        context_lens=tensor([n]),
        block_tables=tensor([list(range(num_blocks))], torch.int32),
        logits_indices=tensor(range(n)),
        query_lens=[n],
        context_lens_host=[n],
    )


def scored_chunks(
    backend: Backend, tokens: list[int], n_ctx: int, *, bos_token_id: int | None,
    block_size: int = 16,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each whole chunk's logits at the scored positions (n_ctx/2 .. n_ctx-2) and the tokens
    they predict, each chunk from an empty cache (module docstring)."""
    backend.allocate_kv(-(-n_ctx // block_size), block_size)
    first = n_ctx // 2
    for chunk in range(len(tokens) // n_ctx):
        window = tokens[chunk * n_ctx : (chunk + 1) * n_ctx]
        inputs = list(window)
        if bos_token_id is not None:
            inputs[0] = bos_token_id
        logits = backend.forward(chunk_batch(inputs, block_size, backend.device))
        yield logits[first : n_ctx - 1], torch.tensor(window[first + 1 :], device=logits.device)


def iter_perplexity(
    backend: Backend,
    tokens: list[int],
    n_ctx: int,
    *,
    bos_token_id: int | None,
    block_size: int = 16,
) -> Iterator[PerplexityEstimate]:
    """Yields the running estimate after each chunk."""
    if n_ctx < 4 or n_ctx % 2:
        raise RequestError(f"--ctx {n_ctx} must be an even number of at least 4")
    if n_ctx > backend.config.context_length:
        raise RequestError(
            f"--ctx {n_ctx} is longer than the model's context of {backend.config.context_length}"
        )
    n_chunks = len(tokens) // n_ctx
    if len(tokens) < 2 * n_ctx:
        raise RequestError(
            f"need at least {2 * n_ctx} tokens for a context of {n_ctx}, "
            f"the text has {len(tokens)}"
        )
    nll = nll2 = 0.0
    count = 0
    chunks = scored_chunks(backend, tokens, n_ctx, bos_token_id=bos_token_id,
                           block_size=block_size)
    for chunk, (logits, targets) in enumerate(chunks):
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        token_nll = -logprobs.gather(1, targets[:, None]).squeeze(1)
        nll += float(token_nll.sum())
        nll2 += float((token_nll * token_nll).sum())
        count += len(targets)
        mean = nll / count
        ppl = math.exp(mean)
        var = nll2 / count - mean * mean
        error = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
        yield PerplexityEstimate(chunk + 1, n_chunks, count, ppl, error)
