"""GPU prefill and batch-1 decode speed of the CUDA backend on synthetic models (run on the device).

For each `shape:quant`, write the synthetic GGUF (loader/synth, random weights: speed does not
depend on the values) unless it exists, prefill a 512-token prompt, then decode 128 tokens per
sequence at each batch size (greedy argmax on the device; the ids come back to the host every
step and the next step's batch is packed from host lists by the engine's BatchPacker, so the
host time per step counts as it does in the engine). `step_us_same_batch` replays one step's
batch 50 times: the device time per step when the host keeps ahead; `step_us_plain_launches`
is the same without programmatic dependent launch (driver.programmatic_launches). The floor is the bytes one
decode step must read (every matrix once, plus the KV read) over the device-to-device copy
bandwidth measured in the same run.

    python bench/decode.py --models-dir /tmp/orcd-bench --out bench/results \
        smollm2-135m:Q4_1@1,8,32,64 smollm2-135m:F16 llama3-8b:Q4_0@1,8,32,64
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import git_commit  # noqa: E402
from gpu.backends.cuda_backend import CudaBackend  # noqa: E402
from gpu.batch import BatchPacker, ForwardBatch  # noqa: E402
from gpu.cuda import driver  # noqa: E402
from gpu.cuda.kernel_timing import copy_bandwidth  # noqa: E402
from gpu.cuda.kernels import TUNING_ENV  # noqa: E402
from loader.synth import SHAPES, parse_quant, write_synthetic_gguf  # noqa: E402
from worker.loaded_model import freeze_startup_objects  # noqa: E402

BLOCK_SIZE = 16
PROMPT_TOKENS = 512
DECODE_TOKENS = 128


def synthetic_model(folder: Path, shape_name: str, quant_name: str) -> Path:
    path = folder / f"{shape_name}-{quant_name.lower()}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_synthetic_gguf(path, SHAPES[shape_name], parse_quant(quant_name))
        print(f"wrote {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def sequence_tables(n_seqs: int, tokens: int) -> list[list[int]]:
    """Block tables of n_seqs sequences of up to `tokens` tokens each, blocks laid end to end:
    the pool these need is len(tables[0]) * n_seqs blocks."""
    per_seq = -(-tokens // BLOCK_SIZE)
    return [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n_seqs)]


SEQ_TOKENS = PROMPT_TOKENS + DECODE_TOKENS + 1  # what a benchmark sequence may hold


def make_batch(packer: BatchPacker, tokens: list[int], start: int, tables: list[list[int]],
               logits_rows: list[int], query_lens: list[int]) -> ForwardBatch:  # fmt: skip
    """Sequences i = 0.. each with query_lens[i] new tokens at positions start.. (same start),
    packed the way the engine packs its steps (one pinned staging buffer, one copy)."""
    positions, slots, context_lens = [], [], []
    for table, n in zip(tables, query_lens, strict=True):
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        context_lens.append(start + n)
    return packer.pack(tokens, positions, slots, query_lens, context_lens, tables, logits_rows)


def count_launches(backend: CudaBackend, batch: ForwardBatch) -> int:
    """Kernel launches of one eager decode step (= graph nodes of the captured step)."""
    count = 0
    original = driver.LaunchSite.launch

    def counting(self, *args):
        nonlocal count
        count += 1
        return original(self, *args)

    driver.LaunchSite.launch = counting
    try:
        backend.use_graphs = False
        backend.forward(batch)
        torch.cuda.synchronize()
    finally:
        driver.LaunchSite.launch = original
        backend.use_graphs = True
    return count


def prefill(backend: CudaBackend, packer: BatchPacker, prompt: list[int],
            tables: list[list[int]]) -> torch.Tensor:  # fmt: skip
    """The same prompt into each sequence's blocks, up to 8 sequences per forward call."""
    for first in range(0, len(tables), 8):
        group = tables[first : first + 8]
        n = len(prompt)
        batch = make_batch(packer, prompt * len(group), 0, group,
                           [n * (i + 1) - 1 for i in range(len(group))], [n] * len(group))
        logits = backend.forward(batch)
    return logits


def replay_step_us(backend: CudaBackend, batch, steps: int = 50) -> tuple[float, float]:
    """(device µs per decode step, median host µs per forward call), the same batch replayed
    back to back: the device time when the host keeps ahead of it."""
    backend.forward(batch)  # captures the graph if this mode has none yet
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_us = []
    start.record()
    for _ in range(steps):
        h0 = time.perf_counter()
        backend.forward(batch)
        host_us.append((time.perf_counter() - h0) * 1e6)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / steps, statistics.median(host_us)


def step_without_programmatic_launches(backend: CudaBackend, batch) -> float | None:
    """The same step with plain stream-ordered launches (None where programmatic launch is off
    already): what driver.programmatic_launches gains, measured in the same run."""
    if not backend.programmatic:
        return None
    graphs = dict(backend._graphs)
    backend.programmatic, backend._graphs = False, {}
    try:
        return round(replay_step_us(backend, batch)[0], 1)
    finally:
        backend.programmatic, backend._graphs = True, graphs


def run_batch(backend: CudaBackend, shape: str, quant: str, batch_size: int, copy_bw: float,
              load_s: float) -> dict:  # fmt: skip
    """Prefill timing (one 512-token sequence), then batch_size sequences decode 128 tokens."""
    device, c = backend.device, backend.config
    tables = sequence_tables(batch_size + 1, SEQ_TOKENS)  # the last: prefill warm-up only
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (PROMPT_TOKENS,), generator=gen).tolist()
    packer = BatchPacker(device)
    # Prefill: warm up on the spare sequence, then time one sequence's 512 tokens.
    for table in (tables[-1], tables[0]):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = prefill(backend, packer, prompt, [table])
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
    if batch_size > 1:  # the other sequences of the decode batch, same prompt
        prefill(backend, packer, prompt, tables[1:batch_size])
    rows = list(range(batch_size))
    seq_tables = tables[:batch_size]
    tokens = logits.argmax(-1).tolist() * batch_size
    first = make_batch(packer, tokens, PROMPT_TOKENS, seq_tables, rows, [1] * batch_size)
    nodes = count_launches(backend, first)
    backend.forward(first)  # capture this context's graph before timing (it rewrites the same KV)
    host_us, pos = [], PROMPT_TOKENS
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        h0 = time.perf_counter()
        batch = make_batch(packer, tokens, pos, seq_tables, rows, [1] * batch_size)
        logits = backend.forward(batch)
        next_ids = logits.argmax(-1)
        host_us.append((time.perf_counter() - h0) * 1e6)
        tokens = next_ids.tolist()  # the ids come back every step, as in the engine
        pos += 1
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - t0
    batch = make_batch(packer, tokens, pos - 1, seq_tables, rows, [1] * batch_size)
    step_us, forward_host_us = replay_step_us(backend, batch)
    plain_step_us = step_without_programmatic_launches(backend, batch)
    kv_token_bytes = 2 * c.n_kv_heads * c.head_dim * 2 * c.n_layers
    mean_context = PROMPT_TOKENS + DECODE_TOKENS / 2
    step_bytes = backend.weights.matrix_bytes() + batch_size * mean_context * kv_token_bytes
    floor = copy_bw / step_bytes * batch_size
    decode_tok_s = DECODE_TOKENS * batch_size / decode_s
    row = {
        "device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
        "commit": COMMIT, "shape": shape, "quant": quant, "batch": batch_size,
        "prefill_tok_s": round(PROMPT_TOKENS / prefill_s, 1),
        "decode_tok_s": round(decode_tok_s, 1), "floor_tok_s": round(floor, 1),
        "fraction_of_floor": round(decode_tok_s / floor, 3),
        "step_bytes": int(step_bytes), "copy_GB_s": round(copy_bw / 1e9, 1),
        "loop_us_per_step": round(statistics.median(host_us), 1),
        "forward_host_us": round(forward_host_us, 1),
        "step_us_same_batch": round(step_us, 1),
        # Per step of the decode loop, the time that is not device time: host work on the
        # critical path (pack, launch, id read-back) while the GPU idles (bench/NOTES.md).
        "gap_us_per_step": round(decode_s * 1e6 / DECODE_TOKENS - step_us, 1),
        "step_us_plain_launches": plain_step_us,
        "graph_nodes_per_step": nodes,
        "kernel_defines": os.environ.get(TUNING_ENV, ""),  # compile-time overrides, if any
        "graph_nodes_per_layer": round((nodes - 3) / c.n_layers, 2),
        "load_s": round(load_s, 1),
        "llama_cpp_decode_tok_s": LLAMA_CPP.get((shape, quant, batch_size)),
        "llama_cpp_prefill_tok_s": LLAMA_CPP_PREFILL.get((shape, quant)),
    }  # fmt: skip
    return row


COMMIT = "unknown"
# llama.cpp on the same H100 (../shared/ANCHORS.md, measured 2026-11-24): llama-bench tg128
# (batch 1) and llama-batched-bench (8, 32, 64 sequences), and pp512. No llama.cpp runs here
# (no network, no build on the device), so these are the anchors, quoted next to our numbers.
LLAMA_CPP = {
    ("smollm2-135m", "Q4_1", 1): 919, ("smollm2-135m", "F16", 1): 950,
    ("llama3-8b", "Q4_0", 1): 317, ("llama3-8b", "Q4_K", 1): 265,
    ("llama3-8b", "Q8_0", 1): 229, ("llama3-8b", "F16", 1): 167,
    ("llama3-8b", "Q4_0", 8): 1221, ("llama3-8b", "Q4_0", 32): 3132,
    ("llama3-8b", "Q4_0", 64): 4136, ("llama3-8b", "F16", 8): 905,
    ("llama3-8b", "F16", 32): 2813, ("llama3-8b", "F16", 64): 4818,
    ("smollm2-135m", "Q4_1", 8): 4478, ("smollm2-135m", "Q4_1", 32): 7163,
    ("smollm2-135m", "Q4_1", 64): 9894,
}  # fmt: skip
LLAMA_CPP_PREFILL = {
    ("smollm2-135m", "Q4_1"): 44000, ("llama3-8b", "Q4_0"): 11077,
    ("llama3-8b", "Q4_K"): 9241, ("llama3-8b", "Q8_0"): 10520, ("llama3-8b", "F16"): 19820,
}  # fmt: skip


def main() -> None:
    global COMMIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+",
                        help="shape:quant[@batches], e.g. llama3-8b:Q4_0@1,8,32,64")  # fmt: skip
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/orcd-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--commit", default=None, help="commit id when .git is not at hand")
    args = parser.parse_args()
    COMMIT = args.commit or git_commit()
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu_decode-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    for spec in args.models:
        spec, _, batches = spec.partition("@")
        shape, quant = spec.split(":")
        path = synthetic_model(args.models_dir, shape, quant)
        batch_sizes = [int(b) for b in (batches or args.batches).split(",")]
        start = time.perf_counter()
        backend = CudaBackend(path)
        load_s = time.perf_counter() - start
        freeze_startup_objects()  # as `orcd worker` does after loading
        tables = sequence_tables(max(batch_sizes) + 1, SEQ_TOKENS)
        backend.allocate_kv(len(tables) * len(tables[0]), BLOCK_SIZE)
        for batch_size in batch_sizes:
            row = run_batch(backend, shape, quant, batch_size, copy_bw, load_s)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")  # kept if a later row fails
        gc.unfreeze()  # the next model's turn: this one's cycles must be collectable again
        del backend
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{'shape':14s} {'quant':5s} {'b':>3s} {'prefill':>9s} {'llama.cpp':>9s} "
          f"{'decode':>8s} {'llama.cpp':>9s} {'floor':>8s} {'frac':>6s} {'step us':>8s} "
          f"{'plain us':>8s} {'gap us':>7s} {'host us':>8s} {'nodes/layer':>11s}")  # fmt: skip
    for r in rows:
        ref_pp, ref_tg = r["llama_cpp_prefill_tok_s"], r["llama_cpp_decode_tok_s"]
        print(f"{r['shape']:14s} {r['quant']:5s} {r['batch']:3d} {r['prefill_tok_s']:9.0f} "
              f"{ref_pp or '-':>9} {r['decode_tok_s']:8.1f} {ref_tg or '-':>9} "
              f"{r['floor_tok_s']:8.1f} {r['fraction_of_floor']:6.1%} "
              f"{r['step_us_same_batch']:8.1f} {r['step_us_plain_launches'] or '-':>8} "
              f"{r['gap_us_per_step']:7.0f} "
              f"{r['forward_host_us']:8.1f} "
              f"{r['graph_nodes_per_layer']:11.2f}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
