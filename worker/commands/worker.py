"""`orcd worker --model M`: serve a model's job stream until SIGTERM/SIGINT (exit 0)."""

from __future__ import annotations

import argparse
import os
import socket
import uuid

from gpu.engine import uses_cuda
from jobs.limits import DEFAULT_MODEL, DEFAULT_SESSION_TTL_S
from worker.admission import DEFAULT_AGING_S
from worker.commands.options import add_backend_options
from worker.daemon import Worker, WorkerConfig
from worker.engine_process import EngineProcess, start_engine_process
from worker.loaded_model import freeze_startup_objects, load_model, prepare_decode
from worker.log import configure_logging
from worker.metrics import WorkerMetrics

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--models-dir", help="directory of NAME.gguf files (or $ORCD_MODELS_DIR)")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help="redis://, rediss:// or unix:// URL, with user:password@ for ACLs "
                        f"(default: $REDIS_URL or {DEFAULT_REDIS_URL})")
    parser.add_argument("--prefix", default="orcd", help="Redis key prefix (default: orcd)")
    add_backend_options(parser)
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split the model over N processes (torch backend, gloo on the CPU; "
                             "default 1); the cuda backend refuses N > 1 (no NCCL sharding yet)")
    parser.add_argument("--id", dest="worker_id", help="worker id (default: host-pid-random)")
    parser.add_argument("--max-jobs", type=int, default=16,
                        help="jobs running at once (default 16)")
    parser.add_argument("--kv-blocks", type=int, help="KV pool size in blocks (default: sized "
                        "from memory)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="read each decode step's tokens before launching the next "
                        "(default: launch it first; the engine's overlap, for A/B runs)")
    parser.add_argument("--no-graph-warmup", dest="graph_warmup", action="store_false",
                        help="capture each CUDA graph of the decode step on first use instead "
                        "of at start-up (default: all of them at start-up, a few seconds, so "
                        "that no step stalls the running jobs for a capture)")
    parser.add_argument("--cancel-check", type=float, default=0.05, metavar="S",
                        help="seconds between reads of the running jobs' cancel keys "
                        "(default 0.05: a cancel takes effect within that)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the engine in a child process of its own, fed requests and "
                        "returning token ids, so the worker's Redis, events and detokenising "
                        "never hold up a step (default: on with the cuda backend, where it "
                        "took the worker's overhead on SmolLM2 at 128 clients from 29-39%% to "
                        "2-7%%; off on the torch backend, whose steps are slow enough not to "
                        "notice, and with --tensor-parallel)")
    parser.add_argument("--no-split-cpus", dest="split_cpus", action="store_false",
                        help="leave the engine process and the worker's threads wherever Linux "
                        "puts them (default with the engine process on the cuda backend: the "
                        "engine on the upper half of the allowed CPUs, the worker on the lower)")
    parser.add_argument("--no-watch-queue", dest="watch_queue", action="store_false",
                        help="no thread blocking on the job streams to wake a busy worker when "
                        "a job comes (engine process only; then a job waits for the loop's "
                        "next turn, up to an engine step)")
    parser.add_argument("--no-publish-thread", dest="publish_thread", action="store_false",
                        help="send the Redis writes from the loop's own thread (default: a "
                        "writer thread sends them while the loop runs the next step)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds given to running jobs on SIGTERM (default 30)")
    parser.add_argument("--reclaim-idle", type=float, default=30.0,
                        help="seconds a dead worker's job waits before it is taken over "
                        "(default 30)")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="seconds between heartbeats (default 1; TTL is 5 beats)")
    parser.add_argument("--stall-timeout", type=float, default=300.0,
                        help="seconds without a turn of the worker loop after which the worker "
                        "stops its heartbeat (its jobs go to others) and exits with status 70 "
                        "(default 300)")
    parser.add_argument("--max-deliveries", type=int, default=3,
                        help="deliveries before a job is dead-lettered (default 3)")
    parser.add_argument("--out-ttl", type=int, default=3600,
                        help="seconds output streams live after done/error (default 3600)")
    parser.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S,
                        help="seconds an idle session keeps its KV and its routing key "
                        f"(default {DEFAULT_SESSION_TTL_S:.0f})")
    parser.add_argument("--priority-aging", type=float, default=DEFAULT_AGING_S,
                        help="seconds of waiting worth one priority level: a queued job "
                        "overtakes one of a level higher that arrived that much later "
                        f"(default {DEFAULT_AGING_S:g})")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (default: off)")
    parser.add_argument("--metrics-host", default="0.0.0.0",
                        help="address the metrics server binds (default 0.0.0.0)")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="JSON log lines even on a terminal")


def run(args: argparse.Namespace) -> int:
    configure_logging(json=args.log_json)
    if args.max_jobs < 1:
        raise SystemExit("orcd worker: --max-jobs must be at least 1")
    if not args.priority_aging > 0:
        raise SystemExit("orcd worker: --priority-aging must be a positive number of seconds")
    metrics = WorkerMetrics()
    if args.metrics_port is not None:  # before loading the model: a taken port fails fast
        metrics.serve(args.metrics_port, args.metrics_host)
    options = dict(backend=args.backend, dtype=args.dtype, kv_blocks=args.kv_blocks,
                   session_ttl_s=args.session_ttl, max_num_seqs=max(args.max_jobs, 1),
                   overlap=args.overlap, priority_aging_s=args.priority_aging,
                   matmul=args.matmul, tensor_parallel=args.tensor_parallel)
    if args.engine_process is None:
        args.engine_process = args.tensor_parallel == 1 and uses_cuda(args.backend)
    if args.engine_process:
        if args.tensor_parallel > 1:
            raise SystemExit("orcd worker: --engine-process does not combine with "
                             "--tensor-parallel (its ranks are processes of the engine's own)")
        model = start_engine_process(args.model, models_dir=args.models_dir,
                                     graph_warmup=args.graph_warmup,
                                     stall_timeout_s=args.stall_timeout,
                                     split_cpus=args.split_cpus and uses_cuda(args.backend),
                                     **options)
    else:
        model = load_model(args.model, models_dir=args.models_dir, **options)
        if args.graph_warmup:
            prepare_decode(model)
    freeze_startup_objects()  # the model stays for the process's life: out of the GC's scans
    config = WorkerConfig(
        worker_id=args.worker_id or default_worker_id(),
        redis_url=args.redis,
        prefix=args.prefix,
        max_jobs=args.max_jobs,
        heartbeat_s=args.heartbeat,
        heartbeat_ttl_s=5 * args.heartbeat,
        reclaim_idle_s=args.reclaim_idle,
        max_deliveries=args.max_deliveries,
        out_ttl_s=args.out_ttl,
        grace_s=args.grace,
        stall_timeout_s=args.stall_timeout,
        priority_aging_s=args.priority_aging,
        cancel_check_s=args.cancel_check,
        publish_thread=args.publish_thread,
        watch_queue=args.watch_queue,
    )
    try:
        return Worker(model, config, metrics=metrics).run()
    finally:
        if isinstance(model.engine, EngineProcess):
            model.engine.close()
