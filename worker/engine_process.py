"""The engine in a process of its own (`orcd worker --engine-process`): `EngineProcess` stands
in for `Engine` in the worker, and a child process runs the real one.

Why: on a small model the engine's host loop (scheduling, packing, launches, the read) is the
step's critical path, and whatever else runs Python in the worker's process (events,
detokenising, JSON, Redis; on any thread, under one GIL) lengthens every step (bench/NOTES.md,
"Worker host loop"). Here the child only steps: it takes requests and aborts from a pipe,
steps while it has work, and sends each step's outputs (token ids, finish reasons), the
engine's events and its stats back. The worker's process does the rest meanwhile.

The child is spawned (it initialises CUDA; the worker's process never does), loads the model
and captures the decode graphs itself, ignores SIGINT/SIGTERM (the worker drains and then
stops it) and exits when the pipe closes (the worker died). What `Engine.add` would refuse at
once is refused here, in the worker's process, with the same messages. Grammars compile in
the child (`RemoteGrammars` hands it the spec and the tokens a resumed job already has).
A step that raises in the child ends every request there (`step()` raises it here, as an
in-process engine's would); a lost device, the child gone, or nothing from it for
`stall_timeout_s` while requests run (a stuck step: the worker's loop itself keeps turning, so
its liveness check cannot see it) raises `DeviceLostError`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from gpu.engine import check_request
from gpu.events import EngineEvent
from gpu.request import DeviceLostError, Request, RequestError, StepOutput
from jobs.errors import OrcdError
from loader.gguf_file import open_gguf
from loader.registry import resolve_model
from tokenizer.tokenizer import GGUFTokenizer
from worker.loaded_model import (
    LoadedModel,
    freeze_startup_objects,
    load_model,
    prepare_decode,
    resolve_dtype,
)
from worker.log import configure_logging, get_logger

STEP_WAIT_S = 0.01  # step(): longest wait for the child's next outputs (the loop polls Redis)
STATS_EVERY_S = 0.05  # the child sends its stats at least this often while it has work
START_TIMEOUT_S = 1800.0  # loading and graph capture of the largest models


def separate_cpus(child_pid: int) -> tuple[list[int], list[int]] | None:
    """Split the CPUs this process may use: the upper half for the engine process, the lower
    half for every thread of this one; None where there is nothing to split (one CPU, no
    `sched_setaffinity`) or the kernel refused.

    Why: the child's loop keeps a CPU busy (launching, then spinning on the device's event),
    and the worker and the child wake each other through a pipe, so Linux's wake-affine
    placement often puts both on one CPU. On an H100 host (16 vCPUs, 2026-12-07) a SmolLM2
    worker at 64 clients then ran 5,300-5,900 tok/s where the same runs with the two apart ran
    7,300-7,600: the child's steps took the parent's share of its CPU. Several workers on one
    host share both halves, their children spread over the upper one."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    cut = len(allowed) // 2
    mine, engine = allowed[:cut], allowed[cut:]
    try:
        os.sched_setaffinity(child_pid, engine)
        for task in os.listdir("/proc/self/task"):  # threads started already (set per thread)
            os.sched_setaffinity(int(task), mine)
    except OSError:  # gone, or not ours to move (a container's policy): leave it to Linux
        return None
    return mine, engine


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def pack_outputs(outputs: list[StepOutput]) -> list[tuple]:
    """A step's outputs as plain tuples for the pipe: pickling 128 slotted dataclasses took
    155 µs on this workplace's CPU, the tuples 26 µs (and 98 -> 42 µs to read them back;
    bench/pipe_outputs.py), on a child whose loop is SmolLM2's critical path. Field order is
    StepOutput's."""
    return [(o.request_id, o.new_token_ids, o.logprobs, o.num_cached_tokens, o.finish_reason,
             o.error, o.engine_fault) for o in outputs]


def unpack_outputs(packed: list[tuple]) -> list[StepOutput]:
    return [StepOutput(*fields) for fields in packed]


class EngineStartError(OrcdError):
    """The engine process did not come up: its own error (a model it cannot load, no device),
    or it died or timed out while loading."""


@dataclass(slots=True)
class RemoteGrammar:
    """A response_format grammar for the child to compile: its spec and the tokens it has
    consumed already (a resumed job's, through `structured.compiler.after_tokens`)."""

    spec: Any
    consumed: list[int] = field(default_factory=list)

    def consume(self, token_id: int) -> None:
        self.consumed.append(token_id)


class RemoteGrammars:
    """The worker's grammar compiler when the engine runs in the child: `submit` resolves at
    once to a `RemoteGrammar` (the child compiles it; a failed compile ends the request there
    with finish_reason `error`, as in-process)."""

    def submit(self, spec) -> Future:
        future: Future = Future()
        future.set_result(RemoteGrammar(spec))
        return future

    def close(self) -> None:
        pass


@dataclass(slots=True)
class _Static:
    """What the worker reads of an engine that never changes."""

    max_model_len: int
    session_ttl_s: float
    vocab_size: int
    architecture: str
    n_layers: int
    backend_name: str
    device: str
    max_num_seqs: int
    load_seconds: float
    graphs: int


class EngineProcess:
    """`Engine`'s interface as the worker uses it, over a pipe to the child (module docstring)."""

    def __init__(self, load_options: dict, graph_warmup: bool = True,
                 start_timeout_s: float = START_TIMEOUT_S,
                 stall_timeout_s: float = 300.0, split_cpus: bool = False) -> None:
        """`stall_timeout_s`: with requests outstanding and nothing from the child for this
        long, its step is stuck (a hung device): `step()` raises `DeviceLostError`, as the
        worker's own liveness check ends an in-process engine's stuck step. `split_cpus`: the
        child and this process on separate halves of the CPUs (`separate_cpus`); `cpus` then
        holds (this process's, the child's)."""
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child_main, name="orcd-engine",
                                        args=(child_conn, load_options, graph_warmup),
                                        daemon=True)
        self._process.start()
        child_conn.close()
        self.cpus = separate_cpus(self._process.pid) if split_cpus else None
        self._outstanding: set[str] = set()
        self._outputs: list[StepOutput] = []
        self._events: list[EngineEvent] = []
        self._stats = None
        self._waiting_fits = True
        self._failure: BaseException | None = None
        self._lost: DeviceLostError | None = None
        self._replies: dict[int, Any] = {}
        self._next_call = 0
        self._stall_timeout_s = stall_timeout_s
        self._heard_at = time.monotonic()  # the child's last message
        # `wake()` ends step()'s wait for the child early: another thread (the publisher's
        # writer, whose send carried the worker's admission read) has something for the loop.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.grammars = RemoteGrammars()
        try:
            if not self._conn.poll(start_timeout_s):
                raise EngineStartError(f"the engine process did not start in "
                                       f"{start_timeout_s:.0f} s")
            message = self._recv()
        except DeviceLostError as exc:
            self.close()
            raise EngineStartError(f"the engine process died while loading the model ({exc}); "
                                   "its log lines above say why") from None
        except EngineStartError:
            self.close()
            raise
        if message[0] != "ready":
            self.close()
            raise EngineStartError(f"the engine process failed to start: {message[1]}")
        static: _Static = message[1]
        self._stats = message[2]
        self.static = static
        self.max_model_len = static.max_model_len
        self.session_ttl_s = static.session_ttl_s
        self.config = SimpleNamespace(vocab_size=static.vocab_size,
                                      architecture=static.architecture,
                                      n_layers=static.n_layers)
        self.backend = SimpleNamespace(name=static.backend_name, device=static.device)
        self.scheduler = SimpleNamespace(max_num_seqs=static.max_num_seqs)

    # ----- what the worker calls --------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Send a request to the child; raises `RequestError` for what `Engine.add` refuses."""
        check_request(request, request.request_id in self._outstanding, self.max_model_len,
                      self.config.vocab_size)
        grammar = request.grammar
        if isinstance(grammar, Future):
            grammar = grammar.result()  # a RemoteGrammar: resolved at once
        if grammar is not None and not isinstance(grammar, RemoteGrammar):
            raise RequestError("a grammar for the engine process must come from its "
                               "RemoteGrammars")
        sent = replace(request, grammar=None)
        self._send(("add", sent, (grammar.spec, grammar.consumed) if grammar else None))
        if not self._outstanding:
            self._heard_at = time.monotonic()  # idle until now: the stall clock starts here
        self._outstanding.add(request.request_id)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        if request_id not in self._outstanding:
            return False
        self._send(("abort", request_id, reason))
        return True

    def has_work(self) -> bool:
        return bool(self._outstanding) or bool(self._outputs)

    def step(self) -> list[StepOutput]:
        """The outputs the child sent since the last call, waiting up to `STEP_WAIT_S` for
        some; raises what the child's step raised (once), `DeviceLostError` for good."""
        if self._lost is not None:
            raise self._lost
        if not self._outputs and self._outstanding:
            self._take(STEP_WAIT_S)
        else:
            self._take(0.0)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._lost is not None:
            raise self._lost
        if self._outstanding and time.monotonic() - self._heard_at > self._stall_timeout_s:
            self._lost = DeviceLostError(
                f"the engine process sent nothing for {self._stall_timeout_s:g} s with "
                f"{len(self._outstanding)} requests running: its step is stuck")
            raise self._lost
        outputs, self._outputs = self._outputs, []
        return outputs

    def pop_events(self) -> list[EngineEvent]:
        events, self._events = self._events, []
        return events

    def stats(self):
        return self._stats

    def waiting_fits(self) -> bool:
        return self._waiting_fits

    def end_session(self, session_id: str) -> bool:
        return bool(self._call("end_session", session_id))

    def session_ids(self) -> list[str]:
        return list(self._call("session_ids"))

    def prepare_decode(self, progress=None) -> int:
        """The child captured its graphs at start (its `graph_warmup`); how many."""
        return self.static.graphs

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (it finishes nothing more) and wait for it."""
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)
        self._conn.close()
        # -1 first: a closed descriptor's number may be reused, and wake() must not write there.
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def wake(self) -> None:
        """End a `step()` waiting for the child now (thread-safe; a no-op once closed)."""
        fd = self._wake_w
        if fd < 0:
            return
        try:
            os.write(fd, b"w")
        except OSError:  # full: a wake is already pending
            pass

    # ----- the pipe ---------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self._lost is not None:
            raise self._lost
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            self._gone(exc)
            raise self._lost from None

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self._gone(exc)
            raise self._lost from None

    def _gone(self, exc: BaseException) -> None:
        code = self._process.exitcode
        self._lost = DeviceLostError(f"the engine process is gone (exit status {code}: "
                                     f"{type(exc).__name__})")
        self._outstanding.clear()

    def _take(self, wait_s: float) -> None:
        """Apply every message waiting in the pipe, after waiting up to `wait_s` for one (or
        for a `wake()`)."""
        try:
            if wait_s > 0:
                woken = multiprocessing.connection.wait([self._conn, self._wake_r], wait_s)
                if self._wake_r in woken:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
            ready = self._conn.poll()
            while ready:
                self._apply(self._recv())
                ready = self._conn.poll()
        except DeviceLostError:
            return
        except (EOFError, OSError) as exc:
            self._gone(exc)

    def _apply(self, message: tuple) -> None:
        self._heard_at = time.monotonic()
        kind = message[0]
        if kind == "out":
            _, packed, events, stats, fits = message
            outputs = unpack_outputs(packed)
            for output in outputs:
                if output.finished:
                    self._outstanding.discard(output.request_id)
            self._outputs += outputs
            self._events += events
            self._stats, self._waiting_fits = stats, fits
        elif kind == "reply":
            self._replies[message[1]] = message[2]
        elif kind == "failed":  # the step raised: the child ended every request
            self._outstanding.clear()
            self._failure = RuntimeError(message[1])
        elif kind == "lost":
            self._lost = DeviceLostError(message[1])
            self._outstanding.clear()

    def _call(self, name: str, *args: Any, timeout_s: float = 30.0) -> Any:
        """A call the worker waits for (rare: sessions), answered between the child's steps."""
        self._next_call += 1
        call = self._next_call
        self._send(("call", call, name, args))
        give_up = time.monotonic() + timeout_s
        while call not in self._replies:
            if self._lost is not None:
                raise self._lost
            if time.monotonic() >= give_up:
                raise RuntimeError(f"the engine process did not answer {name} in {timeout_s} s")
            self._take(0.05)
        return self._replies.pop(call)


def start_engine_process(name: str, *, models_dir: str | os.PathLike | None = None,
                         dtype: str = "float32", graph_warmup: bool = True,
                         stall_timeout_s: float = 300.0, split_cpus: bool = False,
                         **load_options: object) -> LoadedModel:
    """`load_model` with the engine in a child process (worker/engine_process.py): the
    tokenizer is built here, the engine there (weights, KV pool and, with `graph_warmup`, the
    decode graphs); this waits until it is ready. `split_cpus`: see `separate_cpus` (for a
    CUDA engine, whose loop is one busy thread; a torch engine computes on many)."""
    log = get_logger(model=name)
    path = resolve_model(name, models_dir)
    start = time.perf_counter()
    tokenizer = GGUFTokenizer.from_metadata(open_gguf(path).metadata)
    log.info("model.loading", engine_process=True,
             narration=f"Loading {name} in an engine process of its own: it loads the weights"
             + (" and captures the decode graphs" if graph_warmup else "") + " before serving")
    options = {"name": name, "models_dir": models_dir, "dtype": dtype, **load_options}
    engine = EngineProcess(options, graph_warmup=graph_warmup, stall_timeout_s=stall_timeout_s,
                           split_cpus=split_cpus)
    if engine.cpus is not None:
        log.info("engine.cpus", worker_cpus=engine.cpus[0], engine_cpus=engine.cpus[1],
                 narration=f"The engine process runs on CPUs {cpu_list(engine.cpus[1])}, the "
                 f"worker's threads on {cpu_list(engine.cpus[0])}: on one CPU the two would "
                 "share it, and the engine's steps slow down")
    seconds = time.perf_counter() - start
    stats = engine.stats()
    log.info(
        "model.loaded",
        narration=f"Loaded {name} ({engine.config.architecture}, {engine.config.n_layers} "
        f"layers) on {engine.backend.name} in an engine process of its own in {seconds:.2f} s"
        f"; KV pool {stats.kv_blocks_total} blocks of {stats.block_size} tokens"
        + (f", {engine.static.graphs} decode graphs captured" if engine.static.graphs else ""),
        seconds=round(seconds, 3), backend=engine.backend.name,
        kv_blocks=stats.kv_blocks_total, engine_process=True,
    )
    return LoadedModel(name, path, engine, tokenizer, seconds,
                       resolve_dtype(dtype, str(load_options.get("backend", "auto"))))



# ----- the child ------------------------------------------------------------------------------


def _child_main(conn, load_options: dict, graph_warmup: bool) -> None:
    """The engine's loop in the child process (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker drains, then stops this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from structured.compiler import GrammarCompiler, after_tokens

    configure_logging(json=True)
    try:
        model = load_model(progress=False, **load_options)
        graphs = prepare_decode(model, progress=False) if graph_warmup else 0
        freeze_startup_objects()
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which exits with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    engine = model.engine
    grammars = GrammarCompiler(model.tokenizer, engine.config.vocab_size)
    conn.send(("ready", _Static(
        max_model_len=engine.max_model_len, session_ttl_s=engine.session_ttl_s,
        vocab_size=engine.config.vocab_size, architecture=engine.config.architecture,
        n_layers=engine.config.n_layers, backend_name=engine.backend.name,
        device=str(engine.backend.device), max_num_seqs=engine.scheduler.max_num_seqs,
        load_seconds=model.load_seconds, graphs=graphs), engine.stats()))
    try:
        _serve(conn, engine, grammars, after_tokens)
    finally:
        grammars.close()


def _serve(conn, engine, grammars, after_tokens) -> None:
    """Commands in, steps, outputs out, until "stop" or the pipe closes (the worker gone: a
    send to it fails, or the next read does)."""
    try:
        _loop(conn, engine, grammars, after_tokens)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return


def _loop(conn, engine, grammars, after_tokens) -> None:
    last_stats = 0.0
    while True:
        try:
            ready = conn.poll(0.0 if engine.has_work() else 0.05)
            while ready:
                message = conn.recv()
                if message[0] == "stop":
                    return
                _command(conn, engine, grammars, after_tokens, message)
                ready = conn.poll()
        except (EOFError, OSError):
            return  # the worker is gone
        if not engine.has_work():
            continue
        try:
            outputs = engine.step()
        except DeviceLostError as exc:
            conn.send(("lost", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - the worker fails the jobs and goes on
            _end_everything(engine)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            continue
        events = engine.pop_events()
        now = time.monotonic()
        if outputs or events or now - last_stats >= STATS_EVERY_S:
            last_stats = now
            conn.send(("out", pack_outputs(outputs), events, engine.stats(),
                       engine.waiting_fits()))


def _command(conn, engine, grammars, after_tokens, message: tuple) -> None:
    kind = message[0]
    if kind == "add":
        _, request, grammar = message
        if grammar is not None:
            spec, consumed = grammar
            future = grammars.submit(spec)
            request.grammar = after_tokens(future, consumed) if consumed else future
        try:
            engine.add(request)
        except RequestError as exc:  # checked in the worker first: only a bug gets here
            output = StepOutput(request.request_id, [], finish_reason="error")
            output.error = str(exc)
            conn.send(("out", pack_outputs([output]), [], engine.stats(), engine.waiting_fits()))
    elif kind == "abort":
        engine.abort(message[1], message[2])
    elif kind == "call":
        _, call, name, args = message
        conn.send(("reply", call, getattr(engine, name)(*args)))


def _end_everything(engine) -> None:
    """After a step that raised: abort every request and empty the engine."""
    for request_id in list(engine._sequences):  # noqa: SLF001 - the engine's own registry
        engine.abort(request_id)
    try:
        while engine.has_work():
            engine.step()
    except Exception:  # noqa: BLE001 - being emptied: nothing to save
        pass
