"""Decode speed with every sequence constrained to a JSON Schema against unconstrained, on the
CUDA backend with synthetic models (run on the device; the aim is >= 90% of unconstrained at 64
sequences).

For each `shape:quant@batches` the synthetic GGUF is written unless it exists (bench/decode.py's
`synthetic_model`: random weights, the default model's vocabulary in its metadata, so the
grammar sees a real byte-level vocabulary). Each batch size runs twice through the engine, with
the same seeded temperature-1 requests (distinct 128-token random prompts): free, then each
request constrained to SCHEMA, whose minItems keeps every output going past the window. Timed
from the step where every request has WARM_TOKENS tokens to the end, DECODE_TOKENS more each.
`mask_us_per_step` is the host time filling the bitmasks (llguidance's threads), included in
the constrained run's time; `overlapped_steps` shows the engine kept launching ahead.

    python bench/structured.py --models-dir /tmp/orcd-bench smollm2-135m:Q4_1@1,64 \
        llama3-8b:Q4_0@1,64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode import synthetic_model  # noqa: E402
from bench.results_io import git_commit, machine  # noqa: E402
from gpu.backends.cuda_backend import CudaBackend  # noqa: E402
from gpu.engine import Engine  # noqa: E402
from gpu.request import Request, SamplingParams  # noqa: E402
from structured import GrammarCompiler, GrammarSpec  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

BLOCK_SIZE = 16
PROMPT_TOKENS = 128
DECODE_TOKENS = 128
WARM_TOKENS = 3
# An extraction-style schema: records with an id, a bounded name, an enum and a number; at
# least 64 records, so no output completes inside the window.
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["records"],
    "properties": {"records": {"type": "array", "minItems": 64, "items": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "name", "kind", "score"],
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "name": {"type": "string", "maxLength": 24},
            "kind": {"enum": ["person", "place", "thing"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
        }}}},
}  # fmt: skip


def decode(engine: Engine, compiler: GrammarCompiler | None, batch: int) -> dict:
    """`batch` seeded requests (constrained when `compiler` is given); the timed window."""
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for i in range(batch):
        prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=gen).tolist()
        grammar = compiler.submit(spec) if compiler is not None else None
        engine.add(Request(f"b{i}", prompt, SamplingParams(seed=i),
                           max_tokens=WARM_TOKENS + DECODE_TOKENS, ignore_eos=True,
                           grammar=grammar))  # fmt: skip
    counts = dict.fromkeys((f"b{i}" for i in range(batch)), 0)
    reasons = {}
    while min(counts.values()) < WARM_TOKENS:
        for out in engine.step():
            counts[out.request_id] += len(out.new_token_ids)
    fill_s, mask_steps, ahead = engine.masks.fill_s, engine.masks.steps, engine.overlapped_steps
    tokens = steps = 0
    t0 = time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                reasons[out.finish_reason] = reasons.get(out.finish_reason, 0) + 1
        steps += 1
    seconds = time.perf_counter() - t0
    return {
        "decode_tok_s": round(tokens / seconds, 1), "tokens": tokens, "steps": steps,
        "us_per_step": round(seconds * 1e6 / steps, 1),
        "mask_us_per_step": round((engine.masks.fill_s - fill_s) * 1e6 / steps, 1),
        "mask_steps": engine.masks.steps - mask_steps,
        "overlapped_steps": engine.overlapped_steps - ahead, "finish_reasons": reasons,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m:Q4_1@1,64"],
                        help="shape:quant@batches, e.g. llama3-8b:Q4_0@1,64")  # fmt: skip
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/orcd-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--commit", default=None, help="commit id when .git is not at hand")
    parser.add_argument("--backend", choices=("cuda", "torch"), default="cuda",
                        help="torch: a CPU smoke run of this script (its numbers mean little)")
    args = parser.parse_args()
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    out = args.out / f"structured-{now:%Y%m%d-%H%M%S}.json"
    for model in args.models:
        spec, _, batches = model.partition("@")
        shape, quant = spec.split(":")
        path = synthetic_model(args.models_dir, shape, quant)
        if args.backend == "cuda":
            backend = CudaBackend(path)
        else:
            from gpu.backends.torch_backend import TorchBackend

            backend = TorchBackend(path)
        tokenizer = load_tokenizer(path)
        compiler = GrammarCompiler(tokenizer, backend.config.vocab_size)
        started = time.perf_counter()
        compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
        compile_ms = (time.perf_counter() - started) * 1e3  # the vocabulary's tables included
        for batch in [int(b) for b in (batches or "1,64").split(",")]:
            row = {"shape": shape, "quant": quant, "batch": batch,
                   "first_compile_ms": round(compile_ms, 1)}  # fmt: skip
            for name, grammars in (("free", None), ("json_schema", compiler)):
                blocks = -(-(PROMPT_TOKENS + WARM_TOKENS + DECODE_TOKENS) // BLOCK_SIZE)
                engine = Engine(path, backend=backend, block_size=BLOCK_SIZE,
                                kv_blocks=(batch + 1) * blocks, max_num_seqs=batch,
                                max_batch_tokens=batch * PROMPT_TOKENS)  # fmt: skip
                row[name] = decode(engine, grammars, batch)
                del engine
            row["constrained_fraction"] = round(
                row["json_schema"]["decode_tok_s"] / row["free"]["decode_tok_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            payload = {"benchmark": "structured", "date": now.isoformat(timespec="seconds"),
                       "commit": args.commit or git_commit(), "machine": machine(),
                       "schema": SCHEMA, "results": rows}  # fmt: skip
            out.write_text(json.dumps(payload, indent=1) + "\n")  # kept if a later row fails
        compiler.close()
        del backend
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for r in rows:
        print(f"{r['shape']:14s} {r['quant']:5s} b={r['batch']:<3d} free "
              f"{r['free']['decode_tok_s']:9.1f} tok/s  json_schema "
              f"{r['json_schema']['decode_tok_s']:9.1f} tok/s  ({r['constrained_fraction']:.1%})"
              f"  mask {r['json_schema']['mask_us_per_step']:.0f} us/step")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
