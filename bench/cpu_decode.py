"""CPU prefill and decode speed: our torch backend (float32, bfloat16, int8) vs transformers.

Same GGUF, same prompt, same run. Decode is memory-bound, so each row also shows the
bandwidth floor: weight bytes read per step over the copy bandwidth measured here, in this
run. Batching must pay: 4 concurrent sequences should give well over 2x the summed decode
tokens/s of one.

    python bench/cpu_decode.py [--model smollm2-135m] [--prompt-tokens 128] [--decode 48]
"""

from __future__ import annotations

import argparse
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


def run_ours(path: Path, dtype: str, prompt: list[int], n_decode: int, batch: int) -> dict:
    engine = Engine(path, backend="torch", dtype=dtype, kv_blocks=256,
                    max_batch_tokens=max(512, len(prompt) * batch))
    greedy = SamplingParams(temperature=0.0)
    for i in range(batch):
        engine.add(Request(f"r{i}", list(prompt), greedy, max_tokens=n_decode, ignore_eos=True))
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
    args = parser.parse_args()
    from tokenizer.tokenizer import load_tokenizer

    path = resolve_model(args.model)
    prompt = prompt_ids(load_tokenizer(path), args.prompt_tokens)
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
