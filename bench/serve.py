"""Serving under load: one real `orcd worker` on a private redis-server, driven through the v1
wire contract only, against the same jobs run through `Engine` directly.

    python bench/serve.py --backend cuda --shape llama3-8b --quant Q4_0 --clients 1,16,64,128
    python bench/serve.py --backend torch --shape smollm2-135m --quant Q8_0 --layers 2 \\
        --clients 1,2 --prompt-tokens 16,64 --output-tokens 8,32 --jobs-per-client 3   # CPU

What it does, in one process tree:

1. `orcd synth` writes a synthetic model (random weights, the shape's real vocabulary);
2. the engine phase (a subprocess, so that its GPU memory is gone before the worker starts)
   runs every closed-loop workload through `Engine` directly, C requests in flight: the
   engine's own completion tokens/s at each C;
3. a private `redis-server` (`--redis-server PATH`, default: on the PATH, else
   `.whl/bin/redis-server`) and one `orcd worker` (its CLI, `--max-jobs` the largest C);
4. the load generator speaks only Redis (redis-py; it imports nothing of orcd): it XADDs job
   JSON to `orcd:jobs:{model}` (a session's next turn to the routed stream its
   `orcd:session:*` key names, while that worker's heartbeat lives), follows every job's
   `orcd:out:*` with one XREAD over all of them, and times what it sees. Closed loop: C clients
   each keep one job in flight. Open loop (`--rates`): Poisson arrivals at each rate.

Jobs: prompts of `--prompt-tokens LO,HI` words (about one token each) and outputs of
`--output-tokens LO,HI`, drawn long-tailed (Pareto, alpha 1.5, clipped) from `--seed`;
greedy; `--multi-turn` of them open a session whose second turn follows their answer.
Reported per row: completion tokens/s, requests/s, TTFT p50/p99 (submit to first `token`
event), inter-token latency p50/p99 (gaps between a job's `token` events as this client
receives them), queue time p50/p99 (`done.timings.queue_ms`: enqueue to start), errors, lost
jobs (a submitted job without exactly one `done`), and for closed loops the worker overhead =
1 - worker tok/s / engine tok/s, the engine's own TTFT p50/p99 (add to first token: what
the worker's TTFT adds to), its inter-token latency p50/p99 (gaps between a request's tokens
as `Engine.step()` returns them), step time p50/p99 and its steps (of which with a prompt
chunk: eager, no CUDA graph), and the client's ITL p99 over the engine's. JSON in bench/results/serve-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "orcd"
# Common words that are one token each in SmolLM2's (and the synthetic models') vocabulary.
WORDS = ("the of and to in is was for on that with as it by at from his an were are which "
         "this be or had not but first one their its new after who they have her she two "
         "been other when there all during into school time may years more most only over "
         "city some world would where later up such used many can state about national out "
         "known university united then made").split()


# ----- the workload ---------------------------------------------------------------------------

@dataclass(slots=True)
class JobSpec:
    """One job of the workload; `follow_up` words make a second turn in the same session."""

    index: int
    prompt: str
    max_tokens: int
    follow_up: str | None = None


def long_tailed(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, int(low * rng.paretovariate(1.5))))


def workload(n: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
             multi_turn: float) -> list[JobSpec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        words = long_tailed(rng, *prompt_range)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        follow = None
        if rng.random() < multi_turn:
            follow = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 32)))
        specs.append(JobSpec(i, prompt, long_tailed(rng, *output_range), follow))
    return specs


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ----- the engine phase -----------------------------------------------------------------------

def synth_name(shape: str, quant: str) -> str:
    """The model name a benchmark gives the synthetic file it writes for shape and quant."""
    return f"synth-{shape}-{quant}".lower().replace("_", "-")


def engine_phase(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Completion tokens/s and TTFT p50/p99 (add to first token) of `Engine` itself at each
    closed-loop C, same jobs (subprocess)."""
    sys.path.insert(0, str(ROOT))
    from gpu.request import Request, SamplingParams
    from worker.loaded_model import load_model, prepare_decode

    model = load_model(args.model_name, models_dir=args.models_dir, backend=args.backend,
                       dtype=args.dtype, kv_blocks=args.kv_blocks, progress=False,
                       max_num_seqs=args.max_jobs)
    prepare_decode(model, progress=False)  # as `orcd worker` does at start-up
    engine, tokenizer = model.engine, model.tokenizer
    out = {}
    for clients in [0, *args.client_list]:  # 0: a warm-up (compiles, captures), not reported
        if clients == 0:
            specs = workload(2, args.seed + 1, args.prompt_range, (4, 8), 0.0)
            clients = 1
            warm = True
        else:
            specs = workload(clients * args.jobs_per_client, args.seed, args.prompt_range,
                             args.output_range, args.multi_turn)
            warm = False
        queue = list(specs)
        follow: dict[str, tuple[JobSpec, list[int]]] = {}
        live: dict[str, tuple[JobSpec, list[int], bool]] = {}
        added: dict[str, float] = {}
        last_token: dict[str, float] = {}
        ttft: list[float] = []
        itl: list[float] = []  # gaps between a request's tokens as step() returns them
        steps: list[float] = []  # step() durations (ms)
        tokens = 0
        steady_tokens, steady_end = 0, None  # as LoadGenerator: until a client finds no job

        # First turns are tokenized before the clock starts: the worker tokenizes in its own
        # process while the engine process steps, so tokenizing inside this loop (~0.3 ms a
        # prompt on this workload) would slow the reference, not the engine. Second turns
        # depend on the first's answer: tokenized when they are sent, here as there.
        first_turns = {spec.index: tokenizer.encode(spec.prompt, parse_special=False)
                       for spec in specs}

        def add(spec: JobSpec, prompt: str, turn2: bool, clients=clients, live=live,
                warm=warm, added=added, first_turns=first_turns) -> None:
            request_id = f"e{clients}-{warm}-{spec.index}-{int(turn2)}"
            session = f"s{clients}-{warm}-{spec.index}" if spec.follow_up else None
            ids = tokenizer.encode(prompt, parse_special=False) if turn2 \
                else first_turns[spec.index]
            engine.add(Request(request_id, ids,
                               SamplingParams(temperature=0), max_tokens=spec.max_tokens,
                               stop_token_ids=tokenizer.end_of_generation_ids,
                               session_id=session))
            live[request_id] = (spec, [], turn2)
            added[request_id] = time.perf_counter()

        start = time.perf_counter()
        launched, prefills = engine.launched_steps, engine.prefill_steps
        while queue or live:
            while len(live) < clients and (follow or queue):
                if follow:
                    _, (spec, answer) = follow.popitem()
                    text = tokenizer.decode(answer, skip_special_tokens=True)
                    add(spec, f"{spec.prompt}{text} {spec.follow_up}", True)
                else:
                    spec = queue.pop(0)
                    add(spec, spec.prompt, False)
            if steady_end is None and len(live) < clients:
                steady_end, steady_tokens = time.perf_counter(), tokens
            began = time.perf_counter()
            outputs = engine.step()
            now = time.perf_counter()
            steps.append(1e3 * (now - began))
            for output in outputs:
                spec, ids, turn2 = live[output.request_id]
                if not ids and output.new_token_ids:
                    ttft.append(1e3 * (now - added[output.request_id]))
                elif output.new_token_ids:
                    itl.append(1e3 * (now - last_token[output.request_id]))
                if output.new_token_ids:
                    last_token[output.request_id] = now
                ids += output.new_token_ids
                tokens += len(output.new_token_ids)
                if output.finished:
                    del live[output.request_id]
                    if spec.follow_up and not turn2:
                        follow[output.request_id] = (spec, ids)
        if warm:
            continue
        if steady_end is None:
            steady_end, steady_tokens = time.perf_counter(), tokens
        out[str(clients)] = {"tok_s": tokens / (time.perf_counter() - start),
                             "steady_tok_s": None if steady_end is None or steady_end <= start
                             else steady_tokens / (steady_end - start),
                             "ttft_ms_p50": percentile(ttft, 50),
                             "ttft_ms_p99": percentile(ttft, 99),
                             "itl_ms_p50": percentile(itl, 50),
                             "itl_ms_p99": percentile(itl, 99),
                             "step_ms_p50": percentile(steps, 50),
                             "step_ms_p99": percentile(steps, 99),
                             "steps": engine.launched_steps - launched,
                             "prefill_steps": engine.prefill_steps - prefills}
        print(f"engine C={clients}: {out[str(clients)]}", file=sys.stderr)
    return out


# ----- the load generator (Redis only) --------------------------------------------------------

@dataclass(slots=True)
class Track:
    """What the client saw of one job."""

    spec: JobSpec
    turn2: bool
    client: int
    submitted: float
    last_id: str = "0"
    token_times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)  # tokens of each token event
    text: list[str] = field(default_factory=list)
    done: dict | None = None
    error: dict | None = None
    finals: int = 0


class LoadGenerator:
    """Closed or open loop over one Redis connection: XADD jobs, one XREAD for all outputs."""

    def __init__(self, url: str, model: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.model = model
        self.tracks: dict[str, Track] = {}
        self.live: set[str] = set()  # jobs without a final event yet (kept as they change:
        # rebuilt from every track each turn, it cost the 128-client loop ~0.3 ms a turn)

    def _stream_for(self, session_id: str | None) -> str:
        shared = f"{PREFIX}:jobs:{self.model}"
        if not session_id:
            return shared
        holder = self.r.get(f"{PREFIX}:session:{session_id}")
        if holder and self.r.exists(f"{PREFIX}:worker:{holder.decode()}"):
            return f"{shared}:{holder.decode()}"
        return shared

    def submit(self, spec: JobSpec, client: int) -> None:
        """A first turn; one that has a follow-up opens the session `s-{job_id}`."""
        job_id = uuid.uuid4().hex
        job = {"v": 1, "job_id": job_id, "model": self.model, "prompt": spec.prompt,
               "sampling": {"temperature": 0, "max_tokens": spec.max_tokens}}
        if spec.follow_up:
            job["session_id"] = f"s-{job_id}"
        self.tracks[job_id] = Track(spec, False, client, time.perf_counter())
        self.live.add(job_id)
        self.r.xadd(self._stream_for(None), {"job": json.dumps(job)})

    def run(self, clients: int | None, specs: list[JobSpec], rate: float | None,
            seed: int) -> dict:
        """Closed loop (`clients` in flight) or open loop (Poisson at `rate` per second)."""
        self.tracks, self.live = {}, set()
        live = self.live
        rng = random.Random(seed)
        queue = list(specs)
        arrivals, t = [], 0.0
        if rate is not None:
            for _ in specs:
                t += rng.expovariate(rate)
                arrivals.append(t)
        start = time.perf_counter()
        free = list(range(clients or 0))
        steady_end = None  # closed loop: when a client first finds no job left to send
        while queue or live:
            now = time.perf_counter()
            if rate is None:
                while free and queue:
                    self.submit(queue.pop(0), free.pop())
                if free and not queue and steady_end is None:
                    steady_end = now
            else:
                while queue and start + arrivals[len(specs) - len(queue)] <= now:
                    self.submit(queue.pop(0), 0)
            if not live:
                if queue and rate is not None:
                    time.sleep(max(0.0, start + arrivals[len(specs) - len(queue)] - now))
                continue
            block = 50
            if rate is not None and queue:
                block = max(1, min(50, int(1e3 * (start + arrivals[len(specs) - len(queue)]
                                                  - now))))
            reply = self.r.xread({f"{PREFIX}:out:{j}": self.tracks[j].last_id for j in live},
                                 block=block)
            seen = time.perf_counter()
            for key, entries in reply or ():
                job_id = key.decode().rsplit(":", 1)[1]
                track = self.tracks[job_id]
                for entry_id, fields in entries:
                    track.last_id = entry_id.decode()
                    kind = fields[b"event"].decode()
                    data = json.loads(fields[b"data"])
                    if kind == "token":
                        track.token_times.append(seen)
                        track.token_counts.append(len(data["token_ids"]))
                        track.text.append(data["text"])
                    elif kind in ("done", "error"):
                        track.finals += 1
                        live.discard(job_id)
                        setattr(track, kind, data)
                        if kind == "done" and track.spec.follow_up and not track.turn2:
                            self._second_turn(job_id, track, data["text"])
                        elif rate is None:
                            free.append(track.client)
        end = time.perf_counter()
        if rate is None and steady_end is None:
            steady_end = end  # the last job ended as the queue ran out: no drain
        return self._report(end - start, start, steady_end)

    def _second_turn(self, first_id: str, first: Track, answer: str) -> None:
        spec = first.spec
        job_id = uuid.uuid4().hex
        prompt = f"{spec.prompt}{answer} {spec.follow_up}"
        session = f"s-{first_id}"
        job = {"v": 1, "job_id": job_id, "model": self.model, "prompt": prompt,
               "session_id": session,
               "sampling": {"temperature": 0, "max_tokens": spec.max_tokens}}
        self.tracks[job_id] = Track(spec, True, first.client, time.perf_counter())
        self.live.add(job_id)
        self.r.xadd(self._stream_for(session), {"job": json.dumps(job)})

    def _report(self, seconds: float, start: float, steady_end: float | None) -> dict:
        """`steady_tok_s`: completion tokens/s while every client had a job in flight (closed
        loop, until a client first found the queue empty): the drain after it runs the
        long-tailed last jobs at a batch far below C."""
        tracks = list(self.tracks.values())
        steady = None
        if steady_end is not None and steady_end > start:
            streamed = sum(n for t in tracks for seen, n in zip(t.token_times, t.token_counts,
                                                                strict=True) if seen <= steady_end)
            steady = round(streamed / (steady_end - start), 2)
        done = [t for t in tracks if t.done is not None]
        ttft = [1e3 * (t.token_times[0] - t.submitted) for t in done if t.token_times]
        itl = [1e3 * (b - a) for t in done for a, b in zip(t.token_times, t.token_times[1:],
                                                            strict=False)]
        queue_ms = [t.done["timings"]["queue_ms"] for t in done]
        # The worker's own time from a job's start to its first token (`done` timings): the
        # client's TTFT less this and the queue wait is the events' way out to the client.
        worker_ttft = [t.done["timings"]["ttft_ms"] for t in done
                       if t.done["timings"].get("ttft_ms") is not None]
        tokens = sum(t.done["usage"]["completion_tokens"] for t in done)
        mismatched = sum(1 for t in done if "".join(t.text) != t.done["text"])
        r2 = lambda x: None if x is None else round(x, 2)  # noqa: E731
        return {
            "jobs": len(tracks),
            "seconds": round(seconds, 3),
            "completion_tokens": tokens,
            "prompt_tokens": sum(t.done["usage"]["prompt_tokens"] for t in done),
            "cached_tokens": sum(t.done["usage"]["cached_tokens"] for t in done),
            "completion_tok_s": round(tokens / seconds, 2),
            "steady_tok_s": steady,
            "steady_seconds": None if steady is None else round(steady_end - start, 3),
            "req_s": round(len(done) / seconds, 3),
            "ttft_ms_p50": r2(percentile(ttft, 50)), "ttft_ms_p99": r2(percentile(ttft, 99)),
            "itl_ms_p50": r2(percentile(itl, 50)), "itl_ms_p99": r2(percentile(itl, 99)),
            "queue_ms_p50": r2(percentile(queue_ms, 50)),
            "queue_ms_p99": r2(percentile(queue_ms, 99)),
            "worker_ttft_ms_p50": r2(percentile(worker_ttft, 50)),
            "worker_ttft_ms_p99": r2(percentile(worker_ttft, 99)),
            "errors": sum(1 for t in tracks if t.error is not None),
            "lost": sum(1 for t in tracks if t.finals != 1),
            "streamed_text_mismatch": mismatched,
        }

    def exactly_one_done(self) -> int:
        """Lost jobs: submitted, and their output stream (read again at the end) does not hold
        exactly one final event."""
        bad = 0
        for job_id in self.tracks:
            kinds = [f[b"event"] for _, f in self.r.xrange(f"{PREFIX}:out:{job_id}")]
            bad += sum(k in (b"done", b"error") for k in kinds) != 1
        return bad


# ----- processes ------------------------------------------------------------------------------

def start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling a process and its children (threads apart, idle time left out) until
    SIGINT; `--nonblocking` so that the sampled process is never paused."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses",
                            "--threads", "--nonblocking", "--rate", "200", "--format", "raw",
                            "-o", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the load starts
    return spy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary(given: str | None) -> str:
    for candidate in (given, shutil.which("redis-server"), str(ROOT / ".whl/bin/redis-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("bench/serve.py: no redis-server (give --redis-server PATH)")


def start_redis(binary: str, directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("bench/serve.py: redis-server did not start")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc; None elsewhere or gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (the worker's engine process), Linux only."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class CpuMeter:
    """CPU use over a run, in % of one core: this client, the worker's process and its
    children (the engine process, plus multiprocessing's resource tracker, idle): which of
    them is saturated (100%) bounds the row."""

    def __init__(self, worker_pid: int) -> None:
        self.pids = {"worker": [worker_pid], "engine": child_pids(worker_pid)}
        self.start = self._read()

    def _read(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"client": time.process_time(),
                                        "wall": time.perf_counter()}
        for name, pids in self.pids.items():
            values = [cpu_seconds(pid) for pid in pids]
            out[name] = None if not values or None in values else sum(values)
        return out

    def report(self) -> dict[str, float]:
        end = self._read()
        wall = end["wall"] - self.start["wall"]
        return {f"{name}_cpu_pct": round(100 * (end[name] - self.start[name]) / wall, 1)
                for name in ("client", "worker", "engine")
                if end[name] is not None and self.start[name] is not None and wall > 0}


def orcd(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cuda", choices=["cuda", "torch"])
    parser.add_argument("--dtype", default="auto", help="torch backend weights (default auto)")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--quant", default="Q4_1")
    parser.add_argument("--layers", type=int, help="fewer blocks (tiny CPU runs)")
    parser.add_argument("--clients", default="1,16,64,128", help="closed-loop C values")
    parser.add_argument("--rates", default="", help="open-loop arrival rates (req/s), comma "
                        "separated (default: none)")
    parser.add_argument("--open-jobs", type=int, default=256, help="jobs per open-loop rate")
    parser.add_argument("--jobs-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", default="64,2048")
    parser.add_argument("--output-tokens", default="16,512")
    parser.add_argument("--multi-turn", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-jobs", type=int, help="worker --max-jobs (default: largest C)")
    parser.add_argument("--kv-blocks", type=int)
    parser.add_argument("--redis-server", help="redis-server binary")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `orcd worker` (repeatable; A/B runs, e.g. "
                        "--worker-arg=--no-publish-thread)")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine phase")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the worker (and its engine "
                        "process) with py-spy, on the PATH, during each closed loop: collapsed "
                        "stacks in DIR/worker-C<clients>.txt (a profile; slows the worker)")
    parser.add_argument("--engine-phase", help=argparse.SUPPRESS)  # internal: JSON args
    parser.add_argument("--name", default="serve", help="results file prefix")
    parser.add_argument("--json", help="write the results here instead of bench/results/")
    args = parser.parse_args()
    if args.engine_phase:
        phase = argparse.Namespace(**json.loads(args.engine_phase))
        phase.prompt_range, phase.output_range = tuple(phase.prompt_range), \
            tuple(phase.output_range)
        print(json.dumps(engine_phase(phase)))
        return 0
    client_list = [int(c) for c in args.clients.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split(","))
    output_range = tuple(int(x) for x in args.output_tokens.split(","))
    max_jobs = args.max_jobs or max(client_list + [1])
    binary = redis_binary(args.redis_server)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        name = synth_name(args.shape, args.quant)
        synth = ["synth", "--shape", args.shape, "--quant", args.quant, "--out",
                 str(folder / f"{name}.gguf"), "--seed", str(args.seed), "--quiet"]
        if args.layers:
            synth += ["--layers", str(args.layers)]
        subprocess.run(orcd(*synth), check=True, env=env, cwd=ROOT)
        engine_rows: dict[str, dict[str, float]] = {}
        if not args.no_engine:
            phase = {"model_name": name, "models_dir": str(folder), "backend": args.backend,
                     "dtype": args.dtype, "kv_blocks": args.kv_blocks, "max_jobs": max_jobs,
                     "client_list": client_list, "jobs_per_client": args.jobs_per_client,
                     "seed": args.seed, "prompt_range": prompt_range,
                     "output_range": output_range, "multi_turn": args.multi_turn}
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                   "--engine-phase", json.dumps(phase)], check=True, env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
            engine_rows = json.loads(done.stdout.strip().splitlines()[-1])
        server, url = start_redis(binary, folder)
        log = (folder / "worker.log").open("w")
        worker_args = ["worker", "--model", name, "--models-dir", str(folder), "--redis", url,
                       "--backend", args.backend, "--dtype", args.dtype, "--id", "bench",
                       "--max-jobs", str(max_jobs)]
        if args.kv_blocks:
            worker_args += ["--kv-blocks", str(args.kv_blocks)]
        worker_args += args.worker_arg
        worker = subprocess.Popen(orcd(*worker_args), env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=log)
        rows = []
        try:
            r = redis.Redis.from_url(url)
            deadline = time.monotonic() + 900
            while not r.exists(f"{PREFIX}:worker:bench"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("worker did not start:\n"
                                     + (folder / "worker.log").read_text()[-4000:])
                time.sleep(0.1)
            load = LoadGenerator(url, name)
            warm = workload(2, args.seed + 1, prompt_range, (4, 8), 0.0)
            load.run(1, warm, None, args.seed)  # first calls compile and capture
            for clients in client_list:
                specs = workload(clients * args.jobs_per_client, args.seed, prompt_range,
                                 output_range, args.multi_turn)
                spy = start_py_spy(worker.pid, Path(args.py_spy) / f"worker-C{clients}.txt") \
                    if args.py_spy else None
                meter = CpuMeter(worker.pid)
                row = {"mode": "closed", "clients": clients,
                       **load.run(clients, specs, None, args.seed), **meter.report()}
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    spy.wait(60)
                row["lost"] = load.exactly_one_done()
                engine = engine_rows.get(str(clients))
                if engine:
                    row["engine_tok_s"] = round(engine["tok_s"], 2)
                    row["engine_ttft_ms_p50"] = round(engine["ttft_ms_p50"], 2)
                    row["engine_ttft_ms_p99"] = round(engine["ttft_ms_p99"], 2)
                    for key in ("itl_ms_p50", "itl_ms_p99", "step_ms_p50", "step_ms_p99",
                                "steps", "prefill_steps"):
                        if engine.get(key) is not None:
                            row[f"engine_{key}"] = round(engine[key], 2)
                    if engine.get("itl_ms_p99"):
                        # The client's ITL tail against the engine's own (same jobs, same C).
                        row["itl_p99_vs_engine"] = round(row["itl_ms_p99"]
                                                         / engine["itl_ms_p99"], 2)
                    row["worker_overhead_pct"] = round(
                        100 * (1 - row["completion_tok_s"] / engine["tok_s"]), 2)
                    if engine.get("steady_tok_s") and row["steady_tok_s"]:
                        row["engine_steady_tok_s"] = round(engine["steady_tok_s"], 2)
                        row["steady_overhead_pct"] = round(
                            100 * (1 - row["steady_tok_s"] / engine["steady_tok_s"]), 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            for rate in rates:
                specs = workload(args.open_jobs, args.seed, prompt_range, output_range,
                                 args.multi_turn)
                row = {"mode": "open", "rate": rate, **load.run(None, specs, rate, args.seed)}
                row["lost"] = load.exactly_one_done()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
            server.kill()
    sys.path.insert(0, str(ROOT))
    from bench.results_io import write_result

    results = {"backend": args.backend, "shape": args.shape, "quant": args.quant,
               "layers": args.layers, "max_jobs": max_jobs, "prompt_tokens": prompt_range,
               "output_tokens": output_range, "multi_turn": args.multi_turn, "seed": args.seed,
               "jobs_per_client": args.jobs_per_client, "worker_args": args.worker_arg,
               "rows": rows}
    print(table(rows))
    print(write_result(args.name, results, Path(args.json) if args.json else None))
    return 0


def table(rows: list[dict]) -> str:
    head = ("| mode | C / rate | jobs | tok/s | engine tok/s | overhead | steady tok/s (engine) "
            "| steady overhead | req/s | TTFT p50/p99 ms | ITL p50/p99 ms | engine ITL p50/p99 ms "
            "| queue p50/p99 ms | CPU % client / worker / engine | errors | lost |")
    lines = [head, "|" + "---|" * 16]
    for row in rows:
        load = row.get("clients", row.get("rate"))
        lines.append(
            f"| {row['mode']} | {load} | {row['jobs']} | {row['completion_tok_s']} | "
            f"{row.get('engine_tok_s', '')} | {row.get('worker_overhead_pct', '')} | "
            f"{row.get('steady_tok_s') or ''} ({row.get('engine_steady_tok_s', '')}) | "
            f"{row.get('steady_overhead_pct', '')} | {row['req_s']} | {row['ttft_ms_p50']} / {row['ttft_ms_p99']} | "
            f"{row['itl_ms_p50']} / {row['itl_ms_p99']} | "
            f"{row.get('engine_itl_ms_p50', '')} / {row.get('engine_itl_ms_p99', '')} | "
            f"{row['queue_ms_p50']} / "
            f"{row['queue_ms_p99']} | {row.get('client_cpu_pct', '')} / "
            f"{row.get('worker_cpu_pct', '')} / {row.get('engine_cpu_pct', '')} | "
            f"{row['errors']} | {row['lost']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
