"""GPU prefill and batch-1 decode speed of the CUDA backend on synthetic models (run on the device).

For each `shape:quant`, write the synthetic GGUF (loader/synth, random weights: speed does not
depend on the values) unless it exists, time the prefill of a 512-token prompt, then decode at
each batch size through the engine itself (gpu/engine.py: scheduler, packer, our sampling
kernel, token ids back to the host every step, stop checks): `batch` greedy requests with
distinct 512-token prompts, timed from the step where each has WARM_TOKENS tokens to the end,
128 tokens each. `decode_overlap` says whether the engine launched each step ahead of reading
the previous one (gpu/engine.py docstring; --no-overlap measures the engine without it).
`step_us_same_batch` replays one step's batch 50 times: the device time per step when the host
keeps ahead; `step_us_plain_launches` is the same without programmatic dependent launch
(driver.programmatic_launches); `gap_us_per_step` = engine time per step - that device step.
The floor is the bytes one decode step must read (every matrix once, plus the KV read) over
the device-to-device copy bandwidth measured in the same run.

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
from gpu.backends.cuda_backend import DEFAULT_MATMUL, MATMUL_MODES, CudaBackend  # noqa: E402
from gpu.batch import BatchPacker, ForwardBatch  # noqa: E402
from gpu.cuda import driver  # noqa: E402
from gpu.cuda.kernel_timing import copy_bandwidth, read_bandwidth  # noqa: E402
from gpu.cuda.kernels import TUNING_ENV  # noqa: E402
from gpu.cuda.tcmm import ctas_per_sm, warps_n  # noqa: E402
from gpu.engine import Engine  # noqa: E402
from gpu.request import Request, SamplingParams  # noqa: E402
from gpu.sampler import PendingTokens  # noqa: E402
from loader.synth import SHAPES, parse_quant, write_synthetic_gguf  # noqa: E402
from worker.loaded_model import freeze_startup_objects  # noqa: E402

BLOCK_SIZE = 16
PROMPT_TOKENS = 512
DECODE_TOKENS = 128
WARM_TOKENS = 3  # tokens per sequence before the timed window: graphs captured, buffers grown


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


SEQ_TOKENS = PROMPT_TOKENS + WARM_TOKENS + DECODE_TOKENS  # what a benchmark sequence may hold


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


def engine_decode(
    engine: Engine, vocab_size: int, batch_size: int
) -> tuple[float, int, int, float]:
    """`batch_size` greedy requests with distinct random prompts through the engine; returns
    (seconds, tokens, steps, seconds waiting for ids) of DECODE_TOKENS steps from the step after
    which every request has WARM_TOKENS tokens. Prompts are admitted MAX_PREFILL_TOKENS at a
    time, so no request may finish inside the window (max_tokens has slack) and every step of
    it decodes all batch_size sequences; the requests are aborted after it.
    The wait is the time spent in PendingTokens.result(): the rest is the host's own work."""
    gen = torch.Generator().manual_seed(batch_size)
    admit_steps = -(-batch_size * PROMPT_TOKENS // MAX_PREFILL_TOKENS)
    for i in range(batch_size):
        prompt = torch.randint(0, vocab_size, (PROMPT_TOKENS,), generator=gen).tolist()
        engine.add(Request(f"b{i}", prompt, SamplingParams(temperature=0.0),
                           max_tokens=WARM_TOKENS + DECODE_TOKENS + admit_steps + 4,
                           ignore_eos=True))  # fmt: skip
    counts = dict.fromkeys((f"b{i}" for i in range(batch_size)), 0)
    while min(counts.values()) < WARM_TOKENS:
        for out in engine.step():
            counts[out.request_id] += len(out.new_token_ids)
    tokens = steps = 0  # no synchronize: with overlap a step is in flight, as in the window
    wait = 0.0
    read = PendingTokens.result

    def timed_read(pending: PendingTokens):
        nonlocal wait
        start = time.perf_counter()
        try:
            return read(pending)
        finally:
            wait += time.perf_counter() - start

    PendingTokens.result = timed_read  # this window only
    try:
        t0 = time.perf_counter()
        while steps < DECODE_TOKENS:
            tokens += sum(len(out.new_token_ids) for out in engine.step())
            steps += 1
        return time.perf_counter() - t0, tokens, steps, wait
    finally:
        PendingTokens.result = read
        for i in range(batch_size):
            engine.abort(f"b{i}")


def prefill_tok_s(backend: CudaBackend, tokens: int) -> float:
    """One sequence's prompt of `tokens` tokens in one forward (a warm-up first), tokens/s."""
    tables = sequence_tables(2, tokens)
    backend.allocate_kv(2 * len(tables[0]), BLOCK_SIZE)
    prompt = torch.randint(0, backend.config.vocab_size, (tokens,),
                           generator=torch.Generator().manual_seed(tokens)).tolist()  # fmt: skip
    packer = BatchPacker(backend.device, backend.uploader())
    for table in tables:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill(backend, packer, prompt, [table])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return tokens / seconds


def run_batch(backend: CudaBackend, path: Path, shape: str, quant: str, batch_size: int,
              bandwidth: dict, load_s: float, overlap: bool, pp: dict) -> dict:  # fmt: skip
    """Prefill timing (one 512-token sequence), then batch_size sequences decode 128 tokens
    through the engine, then the device time of one decode step of that batch."""
    device, c = backend.device, backend.config
    read_bw, copy_bw = bandwidth["read"], bandwidth["copy"]
    admit_steps = -(-batch_size * PROMPT_TOKENS // MAX_PREFILL_TOKENS)
    tables = sequence_tables(batch_size + 1, SEQ_TOKENS + admit_steps + 4)  # last: warm-up only
    backend.allocate_kv(len(tables) * len(tables[0]), BLOCK_SIZE)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (PROMPT_TOKENS,), generator=gen).tolist()
    packer = BatchPacker(device, backend.uploader())
    # Prefill: warm up on the spare sequence, then time one sequence's 512 tokens.
    for table in (tables[-1], tables[0]):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = prefill(backend, packer, prompt, [table])
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
    # Decode through the engine (it allocates its own pool: one sequence's blocks more than
    # the batch needs). Every prompt is admitted in the first step, so the requests decode in
    # lockstep and the window is batch_size sequences throughout.
    engine = Engine(path, backend=backend, kv_blocks=len(tables) * len(tables[0]),
                    block_size=BLOCK_SIZE, max_num_seqs=batch_size,
                    max_batch_tokens=MAX_PREFILL_TOKENS, overlap=overlap)  # fmt: skip
    decode_s, decode_tokens, decode_steps, wait_s = engine_decode(engine, c.vocab_size, batch_size)
    if decode_tokens != DECODE_TOKENS * batch_size:
        raise RuntimeError(f"the engine's window held {decode_tokens} tokens, not "
                           f"{DECODE_TOKENS} per sequence: not every step decoded the batch")  # fmt: skip
    overlapped = engine.overlapped_steps
    del engine
    # The device time of one decode step of this batch, replayed over the KV the engine left
    # (its values do not change the time).
    rows = list(range(batch_size))
    seq_tables = tables[:batch_size]
    tokens = logits.argmax(-1).tolist() * batch_size
    pos = PROMPT_TOKENS + DECODE_TOKENS // 2
    batch = make_batch(packer, tokens, pos, seq_tables, rows, [1] * batch_size)
    nodes = count_launches(backend, batch)
    step_us, forward_host_us = replay_step_us(backend, batch)
    plain_step_us = step_without_programmatic_launches(backend, batch)
    kv_token_bytes = 2 * c.n_kv_heads * c.head_dim * 2 * c.n_layers
    mean_context = PROMPT_TOKENS + DECODE_TOKENS / 2
    step_bytes = backend.weights.matrix_bytes() + batch_size * mean_context * kv_token_bytes
    floor = read_bw / step_bytes * batch_size  # a decode step only reads: the read-only floor
    floor_copy = copy_bw / step_bytes * batch_size
    decode_tok_s = decode_tokens / decode_s
    # Matrix FLOPs per step (2 per weight per sequence) over the device step, against the dense
    # fp16 tensor-core peak: how compute-bound the step is.
    params = sum(m.n_rows * m.n_cols for lin in backend.weights.linears() for m, _ in lin.parts)
    tc_util = 2 * params * batch_size / (step_us * 1e-6) / dense_fp16_peak()
    row = {
        "device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
        "commit": COMMIT, "shape": shape, "quant": quant, "batch": batch_size,
        "matmul": backend.matmul, "batch_invariant": backend.batch_invariant,
        "prefill_tok_s": round(PROMPT_TOKENS / prefill_s, 1),
        **{f"pp{n}_tok_s": round(v, 1) for n, v in pp.items()},
        "decode_tok_s": round(decode_tok_s, 1), "floor_tok_s": round(floor, 1),
        "fraction_of_floor": round(decode_tok_s / floor, 3),
        "floor_copy_tok_s": round(floor_copy, 1),
        "step_floor_us": round(step_bytes / read_bw * 1e6, 1),
        "tensor_core_util": round(tc_util, 3),
        "step_bytes": int(step_bytes), "copy_GB_s": round(copy_bw / 1e9, 1),
        "read_GB_s": round(read_bw / 1e9, 1),
        "decode_path": "engine", "decode_overlap": overlap,
        "engine_steps": decode_steps, "overlapped_steps": overlapped,
        "engine_us_per_step": round(decode_s * 1e6 / decode_steps, 1),
        # The engine's own host work per step (step() less its wait for the ids): with overlap,
        # decode is device-bound while this stays under the device step.
        "engine_host_us_per_step": round((decode_s - wait_s) * 1e6 / decode_steps, 1),
        "forward_host_us": round(forward_host_us, 1),
        "step_us_same_batch": round(step_us, 1),
        # Per engine step, the time that is not the forward's device time: sampling, copies
        # and any host work the device waited for (bench/NOTES.md).
        "gap_us_per_step": round(decode_s * 1e6 / decode_steps - step_us, 1),
        "step_us_plain_launches": plain_step_us,
        "graph_nodes_per_step": nodes,
        "kernel_defines": os.environ.get(TUNING_ENV, ""),  # compile-time overrides, if any
        "tc_ctas_per_sm": ctas_per_sm(),
        "tc_warps_n": warps_n(),
        "tc_prefill_max_tokens": backend.tc_prefill_max_tokens,
        "graph_nodes_per_layer": round((nodes - 3) / c.n_layers, 2),
        "load_s": round(load_s, 1),
        "llama_cpp_decode_tok_s": LLAMA_CPP.get((shape, quant, batch_size)),
        "llama_cpp_prefill_tok_s": LLAMA_CPP_PREFILL.get((shape, quant)),
    }  # fmt: skip
    return row


COMMIT = "unknown"
MAX_PREFILL_TOKENS = 16384  # prompt tokens per engine step while the batch is admitted
# Dense fp16 tensor-core peak (FLOP/s, no sparsity) by device name: H100 SXM and H200 alike.
DENSE_FP16_PEAK = {"H100": 989e12, "H200": 989e12}


def dense_fp16_peak() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_FP16_PEAK.items() if k in name), 989e12)


# llama.cpp on the same H100 (docs/anchors.md, measured 2026-11-24): llama-bench tg128
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
    parser.add_argument("--no-overlap", action="store_true",
                        help="decode with the engine's overlap off (gpu/engine.py)")  # fmt: skip
    parser.add_argument("--matmul", default=DEFAULT_MATMUL, choices=list(MATMUL_MODES),
                        help="the backend's matrix kernels (cuda_backend.MATMUL_MODES; default: "
                        "the backend's own, what users get)")
    parser.add_argument("--pp", default="512",
                        help="prompt lengths timed once per model, e.g. 512,4096")
    parser.add_argument("--write-only", action="store_true",
                        help="write the models' synthetic files and stop (the device scripts "
                        "write them once, then sync, before timing anything)")
    args = parser.parse_args()
    if args.write_only:
        for spec in args.models:
            synthetic_model(args.models_dir, *spec.partition("@")[0].split(":"))
        return
    COMMIT = args.commit or git_commit()
    bandwidth = {"read": read_bandwidth(), "copy": copy_bandwidth()}
    print(f"read-only {bandwidth['read'] / 1e9:.0f} GB/s, copy {bandwidth['copy'] / 1e9:.0f} "
          f"GB/s (read + write)", flush=True)  # fmt: skip
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu_decode-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    for spec in args.models:
        spec, _, batches = spec.partition("@")
        shape, quant = spec.split(":")
        path = synthetic_model(args.models_dir, shape, quant)
        batch_sizes = [int(b) for b in (batches or args.batches).split(",")]
        start = time.perf_counter()
        backend = CudaBackend(path, matmul=args.matmul)
        load_s = time.perf_counter() - start
        freeze_startup_objects()  # as `orcd worker` does after loading
        pp = {int(n): prefill_tok_s(backend, int(n)) for n in args.pp.split(",") if n}
        for batch_size in batch_sizes:
            row = run_batch(backend, path, shape, quant, batch_size, bandwidth, load_s,
                            overlap=not args.no_overlap, pp=pp)  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")  # kept if a later row fails
        gc.unfreeze()  # the next model's turn: this one's cycles must be collectable again
        del backend
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{'shape':14s} {'quant':5s} {'b':>3s} {'prefill':>9s} {'llama.cpp':>9s} "
          f"{'decode':>8s} {'llama.cpp':>9s} {'floor':>8s} {'frac':>6s} {'step us':>8s} "
          f"{'plain us':>8s} {'gap us':>7s} {'host us':>8s} {'engine host':>11s} {'nodes/layer':>11s} {'overlap':>7s} {'tc util':>7s}")  # fmt: skip
    for r in rows:
        ref_pp, ref_tg = r["llama_cpp_prefill_tok_s"], r["llama_cpp_decode_tok_s"]
        print(f"{r['shape']:14s} {r['quant']:5s} {r['batch']:3d} {r['prefill_tok_s']:9.0f} "
              f"{ref_pp or '-':>9} {r['decode_tok_s']:8.1f} {ref_tg or '-':>9} "
              f"{r['floor_tok_s']:8.1f} {r['fraction_of_floor']:6.1%} "
              f"{r['step_us_same_batch']:8.1f} {r['step_us_plain_launches'] or '-':>8} "
              f"{r['gap_us_per_step']:7.0f} "
              f"{r['forward_host_us']:8.1f} {r['engine_host_us_per_step']:11.1f} "
              f"{r['graph_nodes_per_layer']:11.2f} "
              f"{r['overlapped_steps']:3d}/{r['engine_steps']:<3d} "
              f"{r['tensor_core_util']:7.1%}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
