"""The worker's host cost per engine step, measured on the CPU where no GPU exists.

    .venv/bin/python -m bench.worker_loop [--clients 1,16,64,128] [--step-ms 0] [--profile]

A real `Worker` on a private redis-server drives a real `Engine` whose backend computes
nothing (`StubBackend`: no logits, and a sampler that answers one word token per sequence, so
detokenising, events and stop checks do their real work). The same closed-loop jobs then run
through the engine alone, as bench/serve.py's engine phase does: the difference per engine step
is the worker's host overhead, what the GPU rows of bench/serve.py pay when the host loop is
on the critical path. Closed loop: C jobs in flight, a job replaced as soon as it ends (the
replacement's XADD is not timed). `--step-ms` makes the stub's device take that long per step,
launched asynchronously as a GPU's work is (the engine's overlap then hides host time);
`--profile` adds a cProfile breakdown of the worker's host time (publish/JSON, detokenise,
Redis, admission/poll, logging/metrics...). `--backend cuda --shape S --quant Q` (on the
device) runs the same two loops over a real engine on a synthetic model of that shape instead
of the stub, so the profile shows where a GPU worker's loop goes, waits on the device included
(`synchronize`, `tolist`). Results: bench/results/worker_loop-*.json.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.results_io import write_result
from bench.serve import WORDS, JobSpec, synth_name, workload
from gpu.backends.base import (
    Backend,
    PendingTokens,
    SampledToken,
    SamplingRow,
    TokenMask,
)
from gpu.batch import ForwardBatch
from gpu.engine import Engine
from gpu.request import Request, SamplingParams
from jobs.keys import Keys
from jobs.protocol import build_job
from loader.config import read_config
from loader.gguf_file import open_gguf
from loader.registry import resolve_model
from tests.redis_server import RedisServer
from tokenizer.tokenizer import GGUFTokenizer
from worker.daemon import Worker, WorkerConfig
from worker.loaded_model import LoadedModel
from worker.log import configure_logging

MODEL = "smollm2-135m"


class StubDevice:
    """A device that runs one step at a time, `step_s` each, asynchronously: a launch returns
    at once and its result is ready `step_s` after the device is free to start it."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.free_at = 0.0

    def launch(self) -> float:
        self.free_at = max(time.perf_counter(), self.free_at) + self.step_s
        return self.free_at


class StubSampler:
    """Answers each row with a common word token (the row's count of output tokens picks it):
    never an end-of-generation token, so jobs run to `max_tokens`."""

    def __init__(self, word_ids: list[int], device: StubDevice) -> None:
        self.word_ids = word_ids
        self.device = device

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               mask: TokenMask | None = None) -> PendingTokens:
        ids = [self.word_ids[len(row.output_token_ids) % len(self.word_ids)] for row in rows]
        ready_at = self.device.launch()

        def read() -> list[SampledToken]:
            wait = ready_at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return [SampledToken(token_id) for token_id in ids]

        return PendingTokens(torch.tensor(ids, dtype=torch.long), read)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        return self.launch(logits, rows).result()

    def release(self, request_id: str) -> None:
        pass


class StubBackend(Backend):
    """The model's config and nothing else: no weights, no KV, logits of width 1."""

    name = "stub"

    def __init__(self, path: Path, word_ids: list[int], step_s: float) -> None:
        with open_gguf(path) as gguf:
            self.config = read_config(gguf)
        self.device = torch.device("cpu")
        self._sampler = StubSampler(word_ids, StubDevice(step_s))

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        pass

    def kv_bytes_per_block(self, block_size: int) -> int:
        return 1

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return torch.zeros(batch.logits_indices.shape[0], 1)

    def make_sampler(self, seed: int | None) -> StubSampler:
        return self._sampler


def real_model(backend: str, shape: str, quant: str, max_jobs: int, folder: Path,
               seed: int) -> LoadedModel:
    """A synthetic model of `shape` written by `orcd synth`, loaded as `orcd worker` loads it
    (decode graphs captured ahead)."""
    from worker.cli import main as orcd_main
    from worker.loaded_model import load_model, prepare_decode

    name = synth_name(shape, quant)
    code = orcd_main(["synth", "--shape", shape, "--quant", quant, "--out",
                      str(folder / f"{name}.gguf"), "--seed", str(seed), "--quiet"])
    if code:
        raise SystemExit(f"orcd synth failed ({code})")
    model = load_model(name, models_dir=folder, backend=backend, progress=False,
                       max_num_seqs=max_jobs)
    prepare_decode(model, progress=False)
    return model


def stub_model(step_s: float, max_jobs: int, prefill_ahead: bool) -> LoadedModel:
    path = resolve_model(MODEL)
    with open_gguf(path) as gguf:
        tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    word_ids = [tokenizer.encode(" " + word, parse_special=False)[-1] for word in WORDS]
    engine = Engine(path, backend=StubBackend(path, word_ids, step_s), kv_blocks=65536,
                    max_num_seqs=max_jobs, prefill_ahead=prefill_ahead)
    return LoadedModel(MODEL, path, engine, tokenizer, 0.0)


# ----- the two loops --------------------------------------------------------------------------

def engine_loop(model: LoadedModel, specs: list[JobSpec], clients: int) -> dict:
    """The jobs through `Engine` alone, `clients` in flight: wall time, steps, tokens."""
    engine, tokenizer = model.engine, model.tokenizer
    queue, live, tokens, steps = list(specs), set(), 0, 0
    start = time.perf_counter()
    while queue or live:
        while len(live) < clients and queue:
            spec = queue.pop(0)
            request_id = f"e{clients}-{spec.index}-{start}"
            engine.add(Request(request_id, tokenizer.encode(spec.prompt, parse_special=False),
                               SamplingParams(temperature=0), max_tokens=spec.max_tokens,
                               stop_token_ids=tokenizer.end_of_generation_ids))
            live.add(request_id)
        steps += 1
        for output in engine.step():
            tokens += len(output.new_token_ids)
            if output.finished:
                live.discard(output.request_id)
    return {"seconds": time.perf_counter() - start, "steps": steps, "tokens": tokens}


class CountedSteps:
    """Counts a worker's engine steps, the time spent inside them and the tokens they made."""

    def __init__(self, engine: Engine) -> None:
        self.steps, self.seconds, self.tokens = 0, 0.0, 0
        step = engine.step

        def counted():
            start = time.perf_counter()
            outputs = step()
            self.seconds += time.perf_counter() - start
            self.steps += 1
            self.tokens += sum(len(output.new_token_ids) for output in outputs)
            return outputs

        engine.step = counted


def worker_loop(model: LoadedModel, url: str, specs: list[JobSpec], clients: int,
                max_jobs: int, profiler: cProfile.Profile | None, **options) -> dict:
    """The jobs through a real `Worker` on `url`, `clients` in flight; only the worker's
    iterations are timed (and profiled), not the submissions."""
    import redis

    prefix = f"b{clients}"
    worker = Worker(model, WorkerConfig(worker_id="bench", redis_url=url, prefix=prefix,
                                        max_jobs=max_jobs, **options))
    steps = CountedSteps(model.engine)
    submitter, keys = redis.Redis.from_url(url), Keys(prefix)
    worker.open()
    queue, submitted, loop_s = list(specs), 0, 0.0
    try:
        worker.iteration()  # groups and the first heartbeat
        steps.steps, steps.seconds, steps.tokens = 0, 0.0, 0
        submitter.config_resetstat()
        while queue or worker.jobs_done < submitted:
            while queue and submitted - worker.jobs_done < clients:
                spec = queue.pop(0)
                job = build_job(model=model.name, prompt=spec.prompt, temperature=0,
                                max_tokens=spec.max_tokens)
                submitter.xadd(keys.jobs(model.name), {"job": job.model_dump_json(
                    exclude_defaults=True)})
                submitted += 1
            start = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            worker.iteration()
            if profiler is not None:
                profiler.disable()
            loop_s += time.perf_counter() - start
        commands = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat
                    in submitter.info("commandstats").items()}
    finally:
        worker.close()
        del model.engine.step  # the engine's own method again
    commands.pop("xadd", None)  # the submissions' and the events' alike: not told apart
    commands.pop("config|resetstat", None)
    return {"seconds": loop_s, "steps": steps.steps, "step_seconds": steps.seconds,
            "tokens": steps.tokens, "commands": commands}


# ----- the profile, by where the time goes ----------------------------------------------------

# Phases of the host loop: the cumulative time of these functions (file, name). Those marked
# "of which" lie inside an earlier phase; "rest" is the loop's time outside every phase.
PHASES = (
    ("engine.step", "gpu/engine.py", "step"),
    ("publish: flush (Redis round trip, packing)", "worker/publisher.py", "flush"),
    ("publish: event JSON", "worker/publisher.py", "event"),
    ("job events (ActiveJob.push)", "worker/job_runner.py", "push"),
    ("  of which detokenise (TextStream.push)", "worker/text_stream.py", "push"),
    ("poll (reads, apply)", "worker/daemon.py", "_poll"),
    ("plan next poll", "worker/daemon.py", "_plan_poll"),
    ("admit (parse, tokenize, start)", "worker/daemon.py", "_admit"),
    ("finish jobs (metrics, log)", "worker/daemon.py", "_finish"),
    ("maintain (heartbeat, reclaim)", "worker/daemon.py", "_maintain"),
    ("of which logging (structlog, narration)", "structlog/_native.py", "meth"),
)


def breakdown(profiler: cProfile.Profile, seconds: float, steps: int) -> dict[str, float]:
    """µs per engine step of each phase (cumulative time), and the loop's total."""
    stats = pstats.Stats(profiler).stats
    phases: dict[str, float] = defaultdict(float)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        for label, file, name in PHASES:
            if filename.endswith(file) and function == name:
                phases[label] += cumulative
    iteration = sum(cum for (f, _, fn), (_, _, _, cum, _) in stats.items()
                    if f.endswith("worker/daemon.py") and fn == "iteration")
    step_us = lambda s: round(1e6 * s / max(steps, 1), 1)  # noqa: E731
    out = {label: step_us(phases[label]) for label, _, _ in PHASES}
    counted = sum(phases[label] for label, _, _ in PHASES if "of which" not in label)
    out["rest of the loop"] = step_us(iteration - counted)
    out["loop total (profiled)"] = step_us(iteration)
    return out


def top_functions(profiler: cProfile.Profile, steps: int, n: int = 25) -> list[str]:
    stats = pstats.Stats(profiler).stats.items()
    ordered = sorted(stats, key=lambda item: -item[1][2])[:n]
    return [f"{1e6 * own / max(steps, 1):8.1f} µs  {Path(f).name}:{line} {fn}"
            for (f, line, fn), (_, _, own, _, _) in ordered]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,16,64,128")
    parser.add_argument("--jobs-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", default="64,2048")
    parser.add_argument("--output-tokens", default="16,512")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="the stub device's time per step (default 0: host cost alone)")
    parser.add_argument("--max-jobs", type=int, help="worker max_jobs (default: the largest C, "
                        "as bench/serve.py)")
    parser.add_argument("--cancel-check", type=float, help="the worker's cancel_check_s "
                        "(default: its own)")
    parser.add_argument("--no-publish-thread", dest="publish_thread", action="store_false",
                        help="the worker sends its Redis writes from the loop's thread (A/B)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-ahead-only", action="store_true",
                        help="with --step-ms: steps launched ahead decode only (the engine "
                        "before prefill_ahead)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per C; the median is "
                        "reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the worker's loop")
    parser.add_argument("--backend", default="stub", choices=["stub", "cuda", "torch"],
                        help="stub: no model (default); else a real engine on --shape/--quant")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--quant", default="Q4_1")
    parser.add_argument("--name", default="worker_loop")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("bench/worker_loop.py needs redis-server")
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - log lines rendered, as a worker's are
    configure_logging(json=True)
    clients_list = [int(c) for c in args.clients.split(",") if c]
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split(","))
    output_range = tuple(int(x) for x in args.output_tokens.split(","))
    max_jobs = args.max_jobs or max(clients_list)
    options = {} if args.cancel_check is None else {"cancel_check_s": args.cancel_check}
    options["publish_thread"] = args.publish_thread
    # With a device time per step the stub stands for a GPU: steps launched ahead run prefill
    # chunks and admissions too, as on a GPU (Engine.prefill_ahead), unless --decode-ahead-only.
    prefill_ahead = args.step_ms > 0 and not args.decode_ahead_only
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        if args.backend == "stub":
            model = stub_model(args.step_ms / 1000, max_jobs, prefill_ahead)
        else:
            model = real_model(args.backend, args.shape, args.quant, max_jobs, Path(directory),
                               args.seed)
            prefill_ahead = model.engine.prefill_ahead
        gc.collect()
        gc.freeze()  # as `orcd worker` does after loading
        server = RedisServer(Path(directory)).start()
        try:
            warm = workload(4, args.seed + 1, prompt_range, (4, 8), 0.0)
            engine_loop(model, warm, 2)
            worker_loop(model, server.url, warm, 2, max_jobs, None)
            for clients in clients_list:
                specs = workload(clients * args.jobs_per_client, args.seed, prompt_range,
                                 output_range, 0.0)
                runs = []
                for _ in range(args.repeats):  # interleaved: a noisy machine hits both
                    alone = engine_loop(model, specs, clients)
                    profiler = cProfile.Profile() if args.profile else None
                    served = worker_loop(model, server.url, specs, clients, max_jobs, profiler,
                                         **options)
                    runs.append(summary(clients, alone, served))
                row = median_row(runs)
                if profiler is not None:
                    row["profile_us_per_step"] = breakdown(profiler, served["seconds"], served["steps"])
                    row["top_functions"] = top_functions(profiler, served["steps"])
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "top_functions"}),
                      file=sys.__stdout__, flush=True)
        finally:
            server.kill()
    results = {"backend": args.backend, "step_ms": args.step_ms, "prefill_ahead": prefill_ahead,
               "prompt_tokens": prompt_range,
               "output_tokens": output_range, "jobs_per_client": args.jobs_per_client,
               "repeats": args.repeats, "max_jobs": max_jobs, "worker_options": options, "profiled": args.profile, "rows": rows}
    for row in rows:
        for line in row.get("top_functions", []):
            print(f"C={row['clients']} {line}", file=sys.__stdout__)
    print(write_result(args.name, results), file=sys.__stdout__)


def median_row(runs: list[dict]) -> dict:
    """The run of median worker overhead per step, with every run's overhead beside it."""
    ordered = sorted(runs, key=lambda run: run["overhead_us_per_step"])
    row = dict(ordered[len(ordered) // 2])
    row["overhead_us_per_step_runs"] = [run["overhead_us_per_step"] for run in runs]
    return row


def summary(clients: int, alone: dict, served: dict) -> dict:
    us = lambda seconds, n: round(1e6 * seconds / max(n, 1), 1)  # noqa: E731
    engine_step = us(alone["seconds"], alone["steps"])
    worker_step = us(served["seconds"], served["steps"])
    return {
        "clients": clients,
        "tokens": served["tokens"],
        "engine_steps": alone["steps"], "worker_steps": served["steps"],
        "engine_us_per_step": engine_step,
        "worker_us_per_step": worker_step,
        "worker_step_call_us": us(served["step_seconds"], served["steps"]),
        "overhead_us_per_step": round(worker_step - engine_step, 1),
        "overhead_us_per_token": round(1e6 * (served["seconds"] - alone["seconds"])
                                       / max(served["tokens"], 1), 2),
        "engine_tok_s": round(alone["tokens"] / alone["seconds"], 1),
        "worker_tok_s": round(served["tokens"] / served["seconds"], 1),
        "overhead_pct": round(100 * (1 - alone["seconds"] / served["seconds"]), 2),
        # Redis commands per engine step, by name (XADD left out: the submissions make some)
        "commands_per_step": {name: round(calls / max(served["steps"], 1), 2) for name, calls
                              in sorted(served["commands"].items(), key=lambda kv: -kv[1])},
    }


if __name__ == "__main__":
    main()
