"""CPU tensor parallelism (gloo): decode-step latency of TP = 1 against TP = N on one model.

A correctness path, not a fast one: this shows what the gloo collectives (two all-reduces per
layer, one for the embedding, an all-gather of the logits) cost per step on this machine. The
TP = 1 row runs with all the cores, each TP = N rank with cores / N.

    python bench/tp_cpu.py [--shape llama3-8b] [--hidden 1024] [--layers 8] [--tp 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from gpu.backends.torch_backend import TorchBackend  # noqa: E402
from gpu.backends.torch_tp import TensorParallelTorchBackend  # noqa: E402
from gpu.batch import ForwardBatch  # noqa: E402
from loader.synth import SHAPES, write_synthetic_gguf  # noqa: E402

BLOCK_SIZE = 16


def decode_batch(batch: int, context: int) -> ForwardBatch:
    """One new token for each of `batch` sequences with `context - 1` tokens cached."""
    blocks = -(-context // BLOCK_SIZE)
    tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    pos = context - 1
    slots = tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    return ForwardBatch(
        token_ids=torch.arange(batch) * 7 + 1,
        positions=torch.full((batch,), pos),
        slot_mapping=slots,
        query_start=torch.arange(batch + 1),
        context_lens=torch.full((batch,), context),
        block_tables=tables,
        logits_indices=torch.arange(batch),
        query_lens=[1] * batch,
        context_lens_host=[context] * batch,
    )


def step_ms(backend, batch: ForwardBatch, steps: int) -> float:
    backend.forward(batch)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        backend.forward(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--hidden", type=int, default=1024, help="narrowed hidden size")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    base = SHAPES[args.shape]
    heads = args.hidden // base.head_dim
    shape = dataclasses.replace(
        base, name=f"{base.name}-narrow", hidden_size=args.hidden, n_heads=heads,
        n_kv_heads=max(heads * base.n_kv_heads // base.n_heads, args.tp),
        ffn_size=args.hidden * base.ffn_size // base.hidden_size, vocab_size=args.vocab,
    ).with_layers(args.layers)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.gguf")
        write_synthetic_gguf(path, shape, GGMLQuantizationType.Q8_0)
        batches = [int(b) for b in args.batches.split(",")]
        for tp in (1, args.tp):
            if tp == 1:
                backend = TorchBackend(path)
            else:
                backend = TensorParallelTorchBackend(
                    path, tp, threads_per_rank=max(1, torch.get_num_threads() // tp)
                )
            backend.allocate_kv(max(batches) * 8, BLOCK_SIZE)
            with torch.inference_mode():
                for batch in batches:
                    ms = step_ms(backend, decode_batch(batch, 100), args.steps)
                    rows.append({"tp": tp, "batch": batch, "step_ms": round(ms, 3)})
                    print(f"TP={tp} batch {batch}: {ms:.2f} ms per decode step", flush=True)
            if tp > 1:
                backend.close()
    out = write_result("tp_cpu", {
        "shape": dataclasses.asdict(shape), "quant": "Q8_0 (float32 compute)",
        "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "rows": rows,
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
