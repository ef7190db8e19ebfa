"""GPU prefill and batch-1 decode speed of the CUDA backend on synthetic models (run on the device).

For each `shape:quant`, write the synthetic GGUF (loader/synth, random weights: speed does not
depend on the values) unless it exists, prefill a 512-token prompt, then decode 128 tokens per
sequence at each batch size (greedy argmax on the device; the ids come back to the host every
step and the next step's batch is packed from host lists by the engine's BatchPacker, so the
host time per step counts as it does in the engine). `step_us_same_batch` replays one step's
batch 50 times: the device time per step when the host keeps ahead. The floor is the bytes one
decode step must read (every matrix once, plus the KV read) over the device-to-device copy
bandwidth measured in the same run.

    python bench/decode.py --models /tmp/orcd-bench --out bench/results \
        smollm2-135m:Q4_1 smollm2-135m:F16 llama3-8b:Q4_0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from loader.synth import SHAPES, parse_quant, write_synthetic_gguf  # noqa: E402

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


def run_one(path: Path, shape: str, quant: str, batch_size: int, copy_bw: float) -> dict:
    device = torch.device("cuda")
    start = time.perf_counter()
    backend = CudaBackend(path)
    load_s = time.perf_counter() - start
    c = backend.config
    per_seq = -(-(PROMPT_TOKENS + DECODE_TOKENS + 1) // BLOCK_SIZE)
    backend.allocate_kv(per_seq * (batch_size + 1), BLOCK_SIZE)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size + 1)]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (PROMPT_TOKENS,), generator=gen).tolist()
    packer = BatchPacker(device)
    # Prefill: warm up on the spare sequence, then time one sequence's 512 tokens.
    for table in (tables[-1], tables[0]):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = backend.forward(make_batch(packer, prompt, 0, [table], [PROMPT_TOKENS - 1],
                                            [PROMPT_TOKENS]))  # fmt: skip
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
    for table in tables[1:batch_size]:  # the other sequences of the decode batch, same prompt
        backend.forward(make_batch(packer, prompt, 0, [table], [PROMPT_TOKENS - 1],
                                   [PROMPT_TOKENS]))  # fmt: skip
    rows = list(range(batch_size))
    seq_tables = tables[:batch_size]
    tokens = logits.argmax(-1).tolist() * batch_size
    first = make_batch(packer, tokens, PROMPT_TOKENS, seq_tables, rows, [1] * batch_size)
    nodes = count_launches(backend, first)
    backend.forward(first)  # capture this context's graph before timing (it rewrites the same KV)
    torch.cuda.synchronize()
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
    # The step alone (same batch replayed): device time when the host keeps ahead of it.
    batch = make_batch(packer, tokens, pos - 1, seq_tables, rows, [1] * batch_size)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    forward_host = []
    start_event.record()
    for _ in range(50):
        h0 = time.perf_counter()
        backend.forward(batch)
        forward_host.append((time.perf_counter() - h0) * 1e6)
    end_event.record()
    end_event.synchronize()
    step_us = start_event.elapsed_time(end_event) * 1000 / 50
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
        "forward_host_us": round(statistics.median(forward_host), 1),
        "step_us_same_batch": round(step_us, 1),
        "graph_nodes_per_step": nodes,
        "graph_nodes_per_layer": round((nodes - 3) / c.n_layers, 2),
        "load_s": round(load_s, 1),
    }  # fmt: skip
    del backend
    torch.cuda.empty_cache()
    return row


COMMIT = "unknown"


def main() -> None:
    global COMMIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shape:quant, e.g. llama3-8b:Q4_0")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/orcd-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--commit", default=None, help="commit id when .git is not at hand")
    args = parser.parse_args()
    COMMIT = args.commit or git_commit()
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for spec in args.models:
        shape, quant = spec.split(":")
        path = synthetic_model(args.models_dir, shape, quant)
        for batch_size in (int(b) for b in args.batches.split(",")):
            row = run_one(path, shape, quant, batch_size, copy_bw)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu_decode-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'shape':14s} {'quant':5s} {'b':>3s} {'prefill':>9s} {'decode':>8s} {'floor':>8s} "
          f"{'frac':>6s} {'step us':>8s} {'host us':>8s} {'nodes/layer':>11s}")  # fmt: skip
    for r in rows:
        print(f"{r['shape']:14s} {r['quant']:5s} {r['batch']:3d} {r['prefill_tok_s']:9.0f} "
              f"{r['decode_tok_s']:8.1f} {r['floor_tok_s']:8.1f} {r['fraction_of_floor']:6.1%} "
              f"{r['step_us_same_batch']:8.1f} {r['forward_host_us']:8.1f} "
              f"{r['graph_nodes_per_layer']:11.2f}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
