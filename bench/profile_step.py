"""Where one decode step's device time goes, kernel by kernel (run on the device).

    python bench/profile_step.py --models-dir /tmp/orcd-bench llama3-8b:Q4_0 smollm2-135m:Q4_1

Prefills a 512-token prompt, then profiles 20 eager decode steps at batch 1 with torch.profiler
(CUPTI sees our cuLaunchKernel launches like torch's own) and prints, per kernel name, the
device microseconds per step, launches per step and share of the step: the list to work down
when a benchmark row is short of its floor.

Programmatic dependent launch is off here unless `--programmatic`: with it a kernel starts
while the one before it runs and waits on it (grid_dependency.cuh), and the profiler counts
that wait as the waiting kernel's time. The H100 table of 2026-12-07 with it on gave the
8B Q4_0 step at 64 sequences 23.0 ms of kernels against a 14.1 ms step, the norms 17% of it.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode import (  # noqa: E402
    BLOCK_SIZE,
    PROMPT_TOKENS,
    make_batch,
    prefill,
    sequence_tables,
    synthetic_model,
)
from gpu.backends.cuda_backend import DEFAULT_MATMUL, MATMUL_MODES, CudaBackend  # noqa: E402
from gpu.batch import BatchPacker  # noqa: E402

STEPS = 20


def profile_model(path: Path, label: str, batch_size: int, matmul: str,
                  programmatic: bool = False) -> None:
    device = torch.device("cuda")
    backend = CudaBackend(path, matmul=matmul)
    c = backend.config
    tables = sequence_tables(batch_size, PROMPT_TOKENS + STEPS + 2)
    backend.allocate_kv(len(tables) * len(tables[0]), BLOCK_SIZE)
    prompt = torch.randint(0, c.vocab_size, (PROMPT_TOKENS,)).tolist()
    packer = BatchPacker(device, backend.uploader())
    logits = prefill(backend, packer, prompt, tables)
    tokens = logits[-1:].argmax(-1).tolist() * batch_size
    rows = list(range(batch_size))
    backend.use_graphs = False
    backend.programmatic = programmatic
    backend.forward(make_batch(packer, tokens, PROMPT_TOKENS, tables, rows, [1] * batch_size))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(STEPS):
            batch = make_batch(packer, tokens, PROMPT_TOKENS + 1 + step, tables, rows,
                               [1] * batch_size)  # fmt: skip
            backend.forward(batch)
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
            counts[event.name] += 1
    step_us = sum(totals.values()) / STEPS
    launch = "programmatic" if programmatic else "plain launches"
    print(f"\n{label} batch {batch_size} ({matmul}, {launch}): {step_us:.1f} us of kernels per step "
          f"({sum(counts.values()) / STEPS:.0f} launches), {c.n_layers} layers")  # fmt: skip
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        per_step = us / STEPS
        print(f"  {per_step:9.1f} us  {counts[name] / STEPS:6.1f}x  {per_step / step_us:6.1%}  "
              f"{name[:70]}")  # fmt: skip
    del backend
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shape:quant, e.g. llama3-8b:Q4_0")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/orcd-bench"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--matmul", default=DEFAULT_MATMUL, choices=list(MATMUL_MODES),
                        help="the backend's matrix path (default: %(default)s)")
    parser.add_argument("--programmatic", action="store_true",
                        help="launch programmatically, as decode does (kernel times then include "
                        "their wait on the kernel before)")
    args = parser.parse_args()
    for spec in args.models:
        shape, quant = spec.split(":")
        profile_model(synthetic_model(args.models_dir, shape, quant), spec, args.batch,
                      args.matmul, args.programmatic)


if __name__ == "__main__":
    main()
