"""Host time on a decode step's critical path, phase by phase (run on the device).

    python bench/host_step.py --models-dir /tmp/orcd-bench smollm2-135m:Q4_1 llama3-8b:Q4_0

The engine waits for each step's token ids, so from the moment they arrive until the next graph
starts the GPU idles while Python packs the batch and launches: that gap is real time per token
(bench/NOTES.md). This replays bench/decode.py's batch-1 loop with a timer between the phases of
CudaBackend.forward (pack, input staging, graph launch, argmax launch, id readback) and prints the
median µs of each, to show which one to cut. Diagnostic only: it reaches into the backend.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode import (  # noqa: E402
    BLOCK_SIZE,
    PROMPT_TOKENS,
    make_batch,
    prefill,
    sequence_tables,
    synthetic_model,
)
from gpu.backends.cuda_backend import CudaBackend  # noqa: E402
from gpu.batch import BatchPacker  # noqa: E402

STEPS = 100


def time_phases(path: Path, label: str) -> None:
    device = torch.device("cuda")
    backend = CudaBackend(path)
    c = backend.config
    tables = sequence_tables(1, PROMPT_TOKENS + STEPS + 8)
    backend.allocate_kv(len(tables[0]), BLOCK_SIZE)
    prompt = torch.randint(0, c.vocab_size, (PROMPT_TOKENS,)).tolist()
    packer = BatchPacker(device, backend.uploader())
    tokens = prefill(backend, packer, prompt, tables).argmax(-1).tolist()
    for pos in range(PROMPT_TOKENS, PROMPT_TOKENS + 3):  # capture, warm
        batch = make_batch(packer, tokens, pos, tables, [0], [1])
        tokens = backend.forward(batch).argmax(-1).tolist()
    phases: dict[str, list[float]] = {k: [] for k in
                                      ("pack", "forward", "argmax", "readback", "step")}  # fmt: skip
    gc.collect()
    for pos in range(PROMPT_TOKENS + 3, PROMPT_TOKENS + 3 + STEPS):
        t0 = time.perf_counter()
        batch = make_batch(packer, tokens, pos, tables, [0], [1])
        t1 = time.perf_counter()
        logits = backend.forward(batch)
        t2 = time.perf_counter()
        ids = logits.argmax(-1)
        t3 = time.perf_counter()
        tokens = ids.tolist()
        t4 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            value *= 1e6
            phases[key].append(value)
    # The forward call's own pieces, timed alone on a quiet GPU (each synchronised first).
    graph = next(iter(backend._graphs.values()))
    pieces: dict[str, list[float]] = {"input staging": [], "graph launch": [], "torch copy": []}
    for _ in range(50):
        for key, op in (
            ("input staging", lambda: backend._inputs.stage(
                1, batch.token_ids, batch.positions, batch.slot_mapping, batch.context_lens,
                batch.block_tables)),
            ("graph launch", graph.replay),
            ("torch copy", lambda: backend._logits[0, :8].copy_(backend._logits[1, :8])),
        ):  # fmt: skip
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            op()
            pieces[key].append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    print(f"\n{label}: host µs per decode step (median of {STEPS})")
    for key, values in (*phases.items(), *pieces.items()):
        print(f"  {key:14s} {statistics.median(values):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shape:quant, e.g. llama3-8b:Q4_0")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/orcd-bench"))
    args = parser.parse_args()
    for spec in args.models:
        shape, quant = spec.split(":")
        time_phases(synthetic_model(args.models_dir, shape, quant), spec)
        torch.cuda.empty_cache()  # the backend went with time_phases' frame


if __name__ == "__main__":
    main()
