"""BatchPacker: every ForwardBatch field equals the host lists it was packed from, on the CPU
and (marked gpu) through the pinned staging buffers and their one copy."""

from __future__ import annotations

import random

import pytest
import torch

from gpu.batch import BatchPacker


def random_step(rng: random.Random) -> dict:
    query_lens = [rng.choice([1, 1, 3, 17]) for _ in range(rng.randrange(1, 6))]
    n_tokens = sum(query_lens)
    tables = [[rng.randrange(100) for _ in range(rng.randrange(1, 9))] for _ in query_lens]
    return {
        "token_ids": [rng.randrange(50000) for _ in range(n_tokens)],
        "positions": [rng.randrange(4096) for _ in range(n_tokens)],
        "slot_mapping": [rng.randrange(-1, 4096) for _ in range(n_tokens)],
        "query_lens": query_lens,
        "context_lens": [q + rng.randrange(100) for q in query_lens],
        "block_tables": tables,
        "logits_indices": sorted(rng.sample(range(n_tokens), rng.randrange(0, n_tokens + 1))),
    }


def check(batch, step: dict) -> None:
    for name in ("token_ids", "positions", "slot_mapping", "context_lens", "logits_indices"):
        field = getattr(batch, name)
        assert field.dtype == torch.int64 and field.tolist() == step[name], name
    starts = [0]
    for n in step["query_lens"]:
        starts.append(starts[-1] + n)
    assert batch.query_start.tolist() == starts
    width = max(len(t) for t in step["block_tables"])
    assert batch.block_tables.dtype == torch.int32
    assert batch.block_tables.tolist() == [t + [-1] * (width - len(t)) for t in step["block_tables"]]
    assert batch.query_lens == step["query_lens"]
    assert batch.context_lens_host == step["context_lens"]


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
)  # fmt: skip
def test_packed_fields_equal_the_lists(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    uploader = None
    if device == "cuda":
        from gpu.cuda.driver import DriverUploader

        uploader = DriverUploader()
    packer = BatchPacker(torch.device(device), uploader)
    rng = random.Random(0)
    previous = None
    for _ in range(60):  # shapes change and repeat: view caches and buffer growth both run
        step = random_step(rng)
        batch = packer.pack(**step)
        check(batch, step)
        if previous is not None:  # the step before is still intact (two slots in turn)
            check(*previous)
        previous = (batch, step)
