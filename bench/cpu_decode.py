"""CPU prefill and decode speed: our torch backend (float32, bfloat16, int8) vs transformers.

Same GGUF, same prompt, same run. Decode is memory-bound, so each row also shows the
bandwidth floor: weight bytes read per step over the copy bandwidth measured here, in this
run. Batching must pay: 4 concurrent sequences should give well over 2x the summed decode
tokens/s of one.

    python bench/cpu_decode.py [--model smollm2-135m] [--prompt-tokens 128] [--decode 48]

On a shared machine compare in one run: `--repeat 5 --dtypes int8,float32 --threads 1,2
--batches 1` loads each dtype once (no transformers row) and measures every (threads, dtype,
batch) row once per round, rounds interleaved, then reports each row's median and best over
the rounds with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from gpu.engine import Engine  # noqa: E402
from gpu.request import Request, SamplingParams  # noqa: E402
from loader.registry import resolve_model  # noqa: E402

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe. "
)


def copy_bandwidth_gbs(nbytes: int = 1 << 29, repeat: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (the decode floor's yardstick)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times) / 1e9


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT * (n // 10 + 1))
    return ids[:n]


def run_ours(path: Path, dtype: str, prompt: list[int], n_decode: int, batch: int,
             engine: Engine | None = None, tag: str = "r") -> dict:
    """One prefill of `batch` copies of the prompt, then greedy decode; with `engine` (reused
    across rounds) the caller must make each round's prompt distinct, or the prefix cache
    answers its prefill."""
    if engine is None:
        engine = Engine(path, backend="torch", dtype=dtype, kv_blocks=256,
                        max_batch_tokens=max(512, len(prompt) * batch))
    greedy = SamplingParams(temperature=0.0)
    for i in range(batch):
        engine.add(Request(f"{tag}{i}", list(prompt), greedy, max_tokens=n_decode,
                           ignore_eos=True))
    start = time.perf_counter()
    engine.step()  # prefill of every sequence in one step + first token each
    prefill_s = time.perf_counter() - start
    step_times = []
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    step = statistics.median(step_times)
    weight_bytes = engine.backend.weights.nbytes()
    return {
        "prefill_tokens_per_s": len(prompt) * batch / prefill_s,
        "decode_tokens_per_s": batch / step,
        "weight_bytes": weight_bytes,
    }


def rounds(path: Path, prompt: list[int], args: argparse.Namespace) -> dict:
    """Each dtype loaded once; every (threads, dtype, batch) row measured once per round."""
    dtypes, threads = args.dtypes.split(","), [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    engines = {d: Engine(path, backend="torch", dtype=d, kv_blocks=512,
                         max_batch_tokens=max(512, len(prompt) * max(batches)))
               for d in dtypes}
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeat):
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for dtype in dtypes:
                for batch in batches:
                    # A different first token each round: no prefix-cache hit on a reused engine.
                    rotated = prompt[r % len(prompt):] + prompt[:r % len(prompt)]
                    name = f"orcd torch {dtype}, batch {batch}, {n_threads} threads"
                    runs.setdefault(name, []).append(run_ours(
                        path, dtype, rotated, args.decode, batch, engines[dtype], f"{r}-"))
        print(f"round {r + 1}/{args.repeat} done, load {os.getloadavg()}", flush=True)
    print(f"{args.model}: prompt {len(prompt)} tokens, {args.decode} decode steps, "
          f"{args.repeat} rounds, load before {load_before}, after {os.getloadavg()}")
    print(f"{'':40} {'prefill tok/s median':>21} {'decode tok/s median':>20} {'best':>7}")
    rows = {}
    for name, values in runs.items():
        prefill = [v["prefill_tokens_per_s"] for v in values]
        decode = [v["decode_tokens_per_s"] for v in values]
        rows[name] = {"prefill_tokens_per_s_median": statistics.median(prefill),
                      "decode_tokens_per_s_median": statistics.median(decode),
                      "decode_tokens_per_s_best": max(decode),
                      "decode_tokens_per_s_all": decode, "prefill_tokens_per_s_all": prefill,
                      "weight_bytes": values[0]["weight_bytes"]}
        print(f"{name:40} {statistics.median(prefill):21.1f} {statistics.median(decode):20.1f} "
              f"{max(decode):7.1f}")
    return {"model": args.model, "prompt_tokens": len(prompt), "decode_steps": args.decode,
            "rounds": args.repeat, "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(), "rows": rows}


def run_transformers(path: Path, prompt: list[int], n_decode: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - start
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        step_times = []
        for _ in range(n_decode - 1):
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            step_times.append(time.perf_counter() - start)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": 1 / statistics.median(step_times),
        "weight_bytes": weight_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode", type=int, default=48)
    parser.add_argument("--repeat", type=int, help="interleaved rounds (see above)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8", help="with --repeat")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="with --repeat")
    parser.add_argument("--batches", default="1,4", help="with --repeat")
    args = parser.parse_args()
    from tokenizer.tokenizer import load_tokenizer

    path = resolve_model(args.model)
    prompt = prompt_ids(load_tokenizer(path), args.prompt_tokens)
    if args.repeat:
        print(f"wrote {write_result('cpu_decode', rounds(path, prompt, args))}")
        return 0
    bandwidth = copy_bandwidth_gbs()
    rows = {
        "transformers float32, batch 1": run_transformers(path, prompt, args.decode),
        "orcd torch float32, batch 1": run_ours(path, "float32", prompt, args.decode, 1),
        "orcd torch bfloat16, batch 1": run_ours(path, "bfloat16", prompt, args.decode, 1),
        "orcd torch int8, batch 1": run_ours(path, "int8", prompt, args.decode, 1),
        "orcd torch float32, batch 4": run_ours(path, "float32", prompt, args.decode, 4),
        "orcd torch bfloat16, batch 4": run_ours(path, "bfloat16", prompt, args.decode, 4),
        "orcd torch int8, batch 4": run_ours(path, "int8", prompt, args.decode, 4),
    }
    print(f"{args.model}: prompt {len(prompt)} tokens, {args.decode} decode steps, "
          f"{torch.get_num_threads()} threads, copy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'':34} {'prefill tok/s':>14} {'decode tok/s':>13} {'floor tok/s':>12} {'of floor':>9}")
    for name, row in rows.items():
        batch = 4 if "batch 4" in name else 1
        # One decode step reads every weight once, whatever the batch size.
        row["floor_tokens_per_s"] = batch * bandwidth * 1e9 / row["weight_bytes"]
        row["fraction_of_floor"] = row["decode_tokens_per_s"] / row["floor_tokens_per_s"]
        print(f"{name:34} {row['prefill_tokens_per_s']:14.1f} {row['decode_tokens_per_s']:13.1f} "
              f"{row['floor_tokens_per_s']:12.1f} {row['fraction_of_floor']:9.0%}")
    reference = rows["transformers float32, batch 1"]["decode_tokens_per_s"]
    ratios = {
        "int8_vs_transformers_batch1": rows["orcd torch int8, batch 1"]["decode_tokens_per_s"]
        / reference,
        "int8_batch4_vs_batch1": rows["orcd torch int8, batch 4"]["decode_tokens_per_s"]
        / rows["orcd torch int8, batch 1"]["decode_tokens_per_s"],
        "bf16_vs_transformers_batch1": rows["orcd torch bfloat16, batch 1"]["decode_tokens_per_s"]
        / reference,
        "fp32_vs_transformers_batch1": rows["orcd torch float32, batch 1"]["decode_tokens_per_s"]
        / reference,
        "bf16_batch4_vs_batch1": rows["orcd torch bfloat16, batch 4"]["decode_tokens_per_s"]
        / rows["orcd torch bfloat16, batch 1"]["decode_tokens_per_s"],
        "fp32_batch4_vs_batch1": rows["orcd torch float32, batch 4"]["decode_tokens_per_s"]
        / rows["orcd torch float32, batch 1"]["decode_tokens_per_s"],
    }
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    results = {
        "model": args.model, "prompt_tokens": len(prompt), "decode_steps": args.decode,
        "threads": torch.get_num_threads(), "copy_bandwidth_gbs": bandwidth,
        "rows": rows, "ratios": ratios,
    }
    print(f"wrote {write_result('cpu_decode', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
