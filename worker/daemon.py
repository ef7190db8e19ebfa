"""The worker daemon: jobs from Redis Streams through the engine, events back to Redis.

A worker's life, one loop iteration at a time:

1. poll: one pipeline (with the last flush while the engine has work) reads the cancel keys
   of its running jobs (every `cancel_check_s`, 50 ms,
   not every step) and, while it has room (`max_jobs`, and the engine admitted everything it
   was given), takes exactly as many queued
   jobs as it has room for, best priority first (worker/admission.py); once a second it also
   takes, room or not, queued jobs past their deadline and control messages; when idle and
   nothing is queued it blocks ~100 ms on the streams for new entries;
2. admit: validate each entry (bad ones to `orcd:dead`), skip jobs whose output already holds
   `done`, answer jobs past their deadline with `deadline_exceeded`, tokenize, `Engine.add`,
   publish `queued` and `started`;
3. step: one `Engine.step()`; each output becomes `token`/`done` events (`ActiveJob`); a
   running job past its deadline ends with finish_reason `deadline`;
4. flush: every write of the iteration in one MULTI/EXEC, XACK after the job's last event,
   with the next poll's reads riding in the same round trip; the publisher's writer thread
   (`publish_thread`, on by default) sends it while the loop goes on to the next step and
   applies the replies on the turn they are back; without it the loop sends it and waits;
5. maintain: heartbeat every second, reclaim dead workers' jobs every few seconds.

Failures: an error tied to one job (its logits not finite, its detokenising, its stop strings,
its events) ends that job with `engine_error` and the others go on. An error that leaves the
device unusable (`DeviceLostError`) makes the worker write what it can, hand its running jobs
over (claimable at once, as a stop after the grace period does) and exit with status
`EXIT_DEVICE_LOST`, for the service manager to restart it.

Redis going away stops none of this but the reads: writes wait in the publisher until Redis
is back. SIGTERM/SIGINT stop the reads; running jobs finish within the grace period, the rest
are left unacknowledged for another worker; then the worker exits 0.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

import redis
import structlog

from gpu.request import DeviceLostError, Request, RequestError, StepOutput
from jobs.events import (
    DEADLINE_EXCEEDED,
    ENGINE_ERROR,
    INVALID_REQUEST,
    TOO_MANY_DELIVERIES,
    UNKNOWN_MODEL,
)
from jobs.keys import GROUP, QUEUE_CONSUMER, Keys
from structured.compiler import GrammarCompiler, after_tokens
from tokenizer.errors import TokenizerError
from worker.admission import DEFAULT_AGING_S, DEFAULT_WINDOW, Admission
from worker.connection import RedisDown, RedisLink, connect
from worker.consumer import Consumer, Control, Entry, Rejection, parse_entry
from worker.heartbeat import Heartbeat
from worker.job_runner import ActiveJob, Delivery, build_request
from worker.liveness import Liveness
from worker.loaded_model import LoadedModel
from worker.log import (
    add_narration_sink,
    configure_logging,
    get_logger,
    remove_narration_sink,
)
from worker.metrics import WorkerMetrics
from worker.narration import NarrationMirror, narrate_engine_event
from worker.publisher import READS_LOST, Publisher, Unwritable
from worker.queue_watch import QueueWatcher
from worker.resume import Streamed, resumed_request, streamed_so_far
from worker.scripts import ScriptSet
from worker.systemd_notify import SystemdNotifier

EXIT_DEVICE_LOST = 75  # EX_TEMPFAIL: the device failed; a restart (or another worker) serves on
GIL_SWITCH_S = 0.0005  # sys.setswitchinterval with the publisher thread (Worker.open)


@dataclass(slots=True)
class WorkerConfig:
    """Everything `orcd worker` can set; defaults suit production."""

    worker_id: str
    redis_url: str = "redis://localhost:6379/0"
    prefix: str = "orcd"
    max_jobs: int = 16
    block_ms: int = 100  # XREADGROUP wait when idle
    heartbeat_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    reclaim_idle_s: float = 30.0  # a dead worker's job is taken over after this idle time
    reclaim_every_s: float = 1.0
    stall_timeout_s: float = 300.0  # no loop turn for this long: stop beating and exit
    max_deliveries: int = 3
    out_ttl_s: int = 3600  # output streams expire this long after done/error
    grace_s: float = 30.0  # SIGTERM: time given to running jobs
    priority_aging_s: float = DEFAULT_AGING_S  # seconds of waiting worth one priority level
    admission_window: int = DEFAULT_WINDOW  # queued entries per stream admission chooses from
    deadline_sweep_s: float = 1.0  # how often queued jobs past their deadline are answered
    orphan_idle_s: float = 10.0  # an entry of ours we do not run, idle this long: re-queued
    cancel_check_s: float = 0.05  # how often the running jobs' cancel keys are read
    publish_thread: bool = True  # Redis writes sent from a thread of their own (publisher.py)
    watch_queue: bool = True  # a thread sees new entries at once (engine process: queue_watch.py)


@dataclass(slots=True)
class _PollPlan:
    """One poll's reads: cancel flags of `running`, and admission of up to `capacity` jobs."""

    running: list[str]
    capacity: int
    admit: bool
    idle: bool = False  # nothing to step: wait for new entries if none is admitted
    sweep: bool = False  # the periodic admission call, due whatever the queue looked like
    arrivals: int = 0  # the queue watcher's count of arrivals when the plan was made

    def replies_of(self, replies: list) -> tuple[object, object]:
        """(the cancel flags' reply, the admission's reply) of this plan's reads, in the order
        `Worker._queue_poll` queued them; None for a read the plan did not make."""
        flags = replies[0] if self.running else None
        admission = replies[bool(self.running)] if self.admit else None
        return flags, admission


def short(job_id: str) -> str:
    return job_id[:8]


class Worker:
    """One model, one Redis, one loop; `run()` returns the exit status."""

    def __init__(self, model: LoadedModel, config: WorkerConfig,
                 client: redis.Redis | None = None, metrics: WorkerMetrics | None = None) -> None:
        # The narration mirror is one of configure_logging's processors, and loggers bound
        # before configuration keep structlog's defaults: configure first (no-op if done).
        configure_logging()
        self.model = model
        self.engine = model.engine
        self.tokenizer = model.tokenizer
        # Grammars of jobs with a response_format, compiled on their own threads (by the engine's
        # process when it has one: worker/engine_process.py).
        self.grammars = getattr(self.engine, "grammars", None) or GrammarCompiler(
            self.tokenizer, self.engine.config.vocab_size)
        self.config = config
        self.keys = Keys(config.prefix)
        self.worker_id = config.worker_id
        client = client if client is not None else connect(config.redis_url)
        self.redis = client
        self.link = RedisLink(client, on_reconnect=self._on_reconnect)
        self.consumer = Consumer(client, self.keys, model.name, config.worker_id,
                                 reclaim_idle_ms=int(config.reclaim_idle_s * 1000))
        self.scripts = ScriptSet(client)  # Lua scripts of the loop's pipelines, by SHA
        self.publisher = Publisher(self.link, self.keys, out_ttl_s=config.out_ttl_s,
                                   scripts=self.scripts)
        self.admission = Admission(client, [self.consumer.routed, self.consumer.shared],
                                   config.worker_id, window=config.admission_window,
                                   aging_s=config.priority_aging_s, scripts=self.scripts)
        self._next_sweep = 0.0
        self._next_orphan_check = 0.0
        self._next_cancel_check = 0.0
        self._deadlines: dict[str, float] = {}  # running jobs that have a deadline (unix ms)
        self._polled: tuple[_PollPlan, list] | None = None  # reads sent with the last flush
        self._poll_sent: _PollPlan | None = None  # reads handed to the publisher thread
        # Set while idle after a wait that saw nothing new: the next poll only waits again.
        self._quiet_since: dict[str, str] | None = None
        self._completions: list[float] = []  # monotonic times of recent job ends (throughput)
        backend = self.engine.backend
        self.heartbeat = Heartbeat(
            self.keys, config.worker_id,
            {"model": model.name, "backend": backend.name, "device": str(backend.device),
             "max_jobs": config.max_jobs, "load_seconds": round(model.load_seconds, 3),
             "priority_aging_s": config.priority_aging_s},
            interval_s=config.heartbeat_s, ttl_s=config.heartbeat_ttl_s,
        )
        self.active: dict[str, ActiveJob] = {}
        self.jobs_done = 0
        self.stopping = False
        self.deadline = math.inf
        self._signals: list[str] = []
        self._groups_ready = False
        self._next_reclaim = 0.0
        self._mirror = NarrationMirror(self.publisher)
        self.log = get_logger()
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.metrics.watch_streams(client, lambda: [self.consumer.shared, self.consumer.routed])
        self.notifier = SystemdNotifier.from_env()  # does nothing outside systemd
        self.liveness = Liveness(client, self.heartbeat, self.notifier,
                                 stall_timeout_s=config.stall_timeout_s)
        self._next_snapshot = 0.0
        self._watcher: QueueWatcher | None = None

    # ----- life -------------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the worker's log context and mirror narration to Redis (`run` does this)."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id, model=self.model.name)
        add_narration_sink(self._mirror)
        if self.config.publish_thread:
            # A thread waiting for the GIL asks for it after the switch interval (5 ms by
            # default): the loop, back from waiting on the device, would wait that long behind
            # the writer's packing. 0.5 ms bounds that wait at a small share of a step.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_S))
            # An engine in its own process: the loop waits for its outputs, and an admission
            # read that claimed jobs ends that wait, so they start without waiting for the
            # child's next step (worker/engine_process.py).
            if hasattr(self.engine, "wake"):
                self.publisher.on_reads = self._reads_back
                if self.config.watch_queue:
                    self._watcher = QueueWatcher(self.admission, self.engine.wake,
                                                 self._wants_arrivals,
                                                 block_ms=self.config.block_ms)
                    self._watcher.start()
            self.publisher.start_writer()  # after the bind: its log lines carry the worker

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self.publisher.stop_writer()
        remove_narration_sink(self._mirror)
        self.grammars.close()
        structlog.contextvars.unbind_contextvars("worker_id", "model")

    def run(self) -> int:
        self.open()
        restore = self._install_signals()
        try:
            stats = self.engine.stats()
            self.log.info(
                "worker.started",
                narration=f"Worker {self.worker_id} serves {self.model.name} on "
                f"{self.engine.backend.name} ({self.engine.backend.device}): loaded in "
                f"{self.model.load_seconds:.2f} s, KV pool {stats.kv_blocks_total} blocks of "
                f"{stats.block_size} tokens, up to {self.config.max_jobs} jobs at once",
                kv_blocks=stats.kv_blocks_total, max_jobs=self.config.max_jobs,
            )
            try:
                self.iteration()  # groups, a first read and the first heartbeat, from the loop
                self.liveness.start()
                while not self._finished():
                    self.iteration()
            except DeviceLostError as exc:
                return self._device_lost(exc)
            self._shutdown()
        finally:
            restore()
            self.close()
        return 0

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to drain and exit (thread-safe: only sets flags)."""
        self._signals.append(reason)

    def iteration(self) -> None:
        """One pass of the loop; see the module docstring."""
        self.liveness.progress()
        self._take_signals()
        if not self._groups_ready:
            self._setup_groups()
        entries = self._poll()
        if entries:
            self._admit(entries)
        if self._deadlines:
            self._check_deadlines()
        if self.engine.has_work():
            self._step()
        for event in self.engine.pop_events():
            narrate_engine_event(self.log, event)
            self.metrics.engine_event(event)
            if event.kind in ("session_evicted", "session_expired") and event.session_id:
                # The next turn must go to the shared stream, not to a worker without its KV.
                self.publisher.release_session(event.session_id, self.worker_id)
        self._maintain(time.monotonic())
        self._flush()
        if not len(self.publisher) and time.monotonic() >= self._next_orphan_check:
            self._requeue_orphans()
        for job_id, failure in self.publisher.pop_unwritable().items():
            self._unwritable(job_id, failure)
        for job_id in self.publisher.pop_refused_finals():
            self.log.warning(
                "job.lost", job_id=job_id,
                narration=f"Job {short(job_id)} was taken over by another worker: its final "
                "event from here was refused (the other attempt's stands)",
            )
        if not self.engine.has_work() and not self.link.up:
            time.sleep(min(self.link.seconds_to_retry(), self.config.block_ms / 1000) or 0.01)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            # Only a flag here: logging or Redis calls from a handler could interleave with
            # the loop's own.
            signal.signal(sig, lambda signum, frame: self._signals.append(
                signal.Signals(signum).name))

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _take_signals(self) -> None:
        while self._signals:
            reason = self._signals.pop(0)
            if not self.stopping:
                self.stopping = True
                self.deadline = time.monotonic() + self.config.grace_s
                self.notifier.stopping(f"draining {len(self.active)} jobs")
                self.log.info(
                    "worker.draining", signal=reason,
                    narration=f"{reason}: reading no more jobs; finishing {len(self.active)} "
                    f"running within {self.config.grace_s:.0f} s",
                )
            else:
                self.deadline = time.monotonic()
                self.log.info("worker.hurry", signal=reason,
                              narration=f"{reason} again: stopping now")

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        if self.active and time.monotonic() >= self.deadline:
            self._abandon()
        # Reads still with the publisher thread may admit jobs: those start, or are handed
        # back, before the worker stops.
        return not self.active and self._poll_sent is None

    def _abandon(self) -> None:
        """Grace period over: stop the running jobs and hand them over: they stay pending,
        marked claimable at once (Consumer.release), and are reclaimed elsewhere as soon as
        this worker's heartbeat is gone (`_shutdown`)."""
        for job in self.active.values():
            self.engine.abort(job.job_id)
            self.log.warning(
                "job.abandoned", job_id=job.job_id, session_id=job.job.session_id,
                narration=f"Handed job {short(job.job_id)} over unacknowledged: the grace "
                "period is over; another worker takes it once this one has stopped",
            )
        entries = [(job.delivery.stream, job.delivery.entry_id) for job in self.active.values()]
        self.active.clear()
        self._drain_engine()
        try:
            self.link.call(self.consumer.release, entries)
        except RedisDown:
            pass  # they are reclaimed after --reclaim-idle instead

    def _drain_engine(self) -> None:
        try:
            while self.engine.has_work():
                self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the engine is being emptied, nothing to save
            self.log.error("engine.drain_failed", narration=f"Emptying the engine failed: {exc}")

    def _shutdown(self) -> None:
        self.liveness.stop()  # before the heartbeat goes: the thread would write it again
        held = self.engine.session_ids()
        try:
            left = self.link.call(self.redis.xlen, self.consumer.routed)
            pipe = self.redis.pipeline(transaction=False)
            for session_id in held:
                pipe.get(self.keys.session(session_id))
            owners = self.link.call(pipe.execute) if held else []
            for session_id, owner in zip(held, owners, strict=True):
                if owner is not None and owner.decode() == self.worker_id:
                    self.publisher.write("delete", self.keys.session(session_id))
            if left == 0:
                self.publisher.write("delete", self.consumer.routed)
            self.link.call(self.heartbeat.remove, self.redis, keep_entry=left > 0)
        except RedisDown:
            pass
        self.log.info(
            "worker.stopped",
            narration=f"Worker {self.worker_id} stopped: {self.jobs_done} jobs served, "
            f"{len(held)} sessions released",
            jobs_done=self.jobs_done,
        )
        if not self.publisher.drain(max(2.0, self.deadline - time.monotonic())):
            self.log.error("worker.unpublished", count=len(self.publisher),
                           narration=f"Redis stayed away: {len(self.publisher)} writes lost")

    # ----- Redis reads ------------------------------------------------------------------------

    def _setup_groups(self) -> None:
        try:
            self.link.call(self.consumer.ensure_groups)
            self._groups_ready = True
        except RedisDown:
            pass

    def _on_reconnect(self) -> None:
        # A Redis restarted without persistence lost the groups: create them again (raw calls:
        # the link is in the middle of its own call), and its scripts.
        self.scripts.missing = True
        self.consumer.ensure_groups()
        self._groups_ready = True
        self.liveness.beat_soon()
        self.metrics.redis_reconnected()

    def _capacity(self) -> int:
        if self.stopping or not self._groups_ready:
            return 0
        if not self.engine.waiting_fits():
            # What the engine cannot admit for want of memory (KV pool, running set) stays in
            # the stream for another worker. Requests that wait only for the token budget of
            # the next steps (a long prompt's prefill chunks) do not hold admission back: they
            # kept new jobs 30-50 ms in the stream (queue p50 at 64 clients, H100, 2026-12-07).
            return 0
        # An admission still with the publisher thread may start up to its capacity.
        sent = self._poll_sent.capacity if self._poll_sent is not None else 0
        return max(0, self.config.max_jobs - len(self.active) - sent)

    def _flush(self) -> None:
        """Write the iteration's events; the next iteration's reads (cancel flags, admission)
        ride in the same round trip: without the writer thread when there is something to
        write, with it while the engine has work (sent alone if nothing is queued)."""
        if self.publisher.threaded:
            # While the engine has work the next poll's reads go with the writer thread's send:
            # the loop does not wait for their round trip; it applies the replies once back.
            plan = None
            if self._poll_sent is None and self.engine.has_work() and self.link.ready():
                plan = self._plan_poll()  # not idle: the engine has work
            if plan is None:
                self.publisher.flush()
            else:
                self._poll_sent = plan
                self.publisher.flush(reads=lambda pipe: self._queue_poll(pipe, plan))
            return
        plan = self._plan_poll() if len(self.publisher) and self.link.ready() else None
        if plan is None:
            self.publisher.flush()
            return
        if self.publisher.flush(reads=lambda pipe: self._queue_poll(pipe, plan)):
            self._polled = (plan, self.publisher.pop_reads())

    def _reads_back(self, replies) -> None:
        """The writer thread's call once a send's reads are back: wake the loop's wait for the
        engine process only when the admission read claimed jobs. Waking it for every reply
        turned the loop into a storm of admission reads (a turn, a read, a reply, a turn...)
        that took a 2-core machine's CPU from the engine: 10x slower in bench/soak.py."""
        plan = self._poll_sent
        if plan is None or not plan.admit or not isinstance(replies, list):
            return
        if Admission.claimed_any(plan.replies_of(replies)[1]):
            self.engine.wake()
        elif self._watcher is not None and self._watcher.arrivals > plan.arrivals:
            # An entry came after this read was planned (it may have missed it): the next
            # turn's read should go now, not after the child's next step.
            self.engine.wake()

    def _wants_arrivals(self) -> bool:
        """The queue watcher's question (from its thread): would a new entry start now? Only
        while the engine has work: an idle loop blocks on the streams itself."""
        return self.engine.has_work() and self._capacity() > 0  # 0 once stopping

    def _plan_poll(self) -> _PollPlan | None:
        """What the next poll reads: the cancel flags of the running jobs, and an admission
        call when there is room (or a deadline sweep is due); None when nothing."""
        now = time.monotonic()
        running = []
        if now >= self._next_cancel_check:
            # Not every step: an MGET of every running job's key costs the loop ~2 µs a job.
            running = [job_id for job_id, job in self.active.items() if not job.cancelled]
            self._next_cancel_check = now + self.config.cancel_check_s
        capacity = self._capacity()
        # Room or not, queued jobs past their deadline and control messages are taken once
        # in a while (the admission script hands them over whatever the capacity).
        sweep = now >= self._next_sweep and self._groups_ready and not self.stopping
        admit = bool(capacity) or sweep
        if not running and not admit:
            return None
        idle = bool(capacity) and not self.engine.has_work() and not self.stopping
        if admit and not (idle and self._quiet_since is not None and not sweep):
            self._next_sweep = now + self.config.deadline_sweep_s
        arrivals = self._watcher.arrivals if self._watcher is not None else 0
        return _PollPlan(running, capacity, admit, idle, sweep, arrivals)

    def _queue_poll(self, pipe, plan: _PollPlan) -> int:
        """Queue a plan's reads on a pipeline; returns how many commands."""
        if plan.running:
            pipe.mget([self.keys.cancel(job_id) for job_id in plan.running])
        if plan.admit:
            self.admission.queue(pipe, plan.capacity, int(time.time() * 1000),
                                 idle=plan.idle)
        return bool(plan.running) + plan.admit

    def _poll(self) -> list[Entry]:
        """Cancel flags of running jobs and the jobs to start: read with the last flush, or
        in one round trip of their own; when idle and nothing is queued, a wait of up to
        `block_ms` for the next entry."""
        if self._polled is not None:
            (plan, replies), self._polled = self._polled, None
            return self._apply_poll(plan, replies)
        if self._poll_sent is not None:
            # With nothing to step there is nothing to overlap: wait for the replies.
            replies = self.publisher.pop_reads(0.0 if self.engine.has_work() else 1.0)
            if replies is None and self.publisher.threaded:
                return []  # not back yet
            plan, self._poll_sent = self._poll_sent, None
            if replies is None or replies is READS_LOST:
                return []  # not sent (Redis away): what they would have admitted stays queued
            return self._apply_poll(plan, replies)
        if not self.link.ready():
            return []
        plan = self._plan_poll()
        if plan is None:
            return []
        if plan.idle and not plan.running and self._quiet_since is not None and not plan.sweep:
            self._wait_idle(self._quiet_since)  # nothing new since the last admission call
            return []
        pipe = self.redis.pipeline(transaction=False)

        def read() -> list:
            self._queue_poll(pipe, plan)  # may load the admission script first
            return pipe.execute(raise_on_error=False)

        try:
            replies = self.link.call(read)
        except RedisDown:
            return []
        return self._apply_poll(plan, replies)

    def _apply_poll(self, plan: _PollPlan, replies: list) -> list[Entry]:
        flags, reply = plan.replies_of(replies)
        if plan.running:
            if not isinstance(flags, Exception):
                for job_id, flag in zip(plan.running, flags, strict=True):
                    job = self.active.get(job_id)
                    if flag is not None and job is not None and not job.cancelled:
                        self._cancel(job)
        if not plan.admit:
            return []
        if self.scripts.refused(reply):
            return []  # Redis lost the scripts (restarted): loaded again for the next poll
        if isinstance(reply, redis.ResponseError):
            if "NOGROUP" in str(reply) or "no such key" in str(reply).lower():
                self._groups_ready = False  # the stream or group was deleted: create again
            else:
                self.log.error("redis.read_failed", narration=f"Reading jobs failed: {reply}")
            return []
        admitted = self.admission.parse(reply)
        self._quiet_since = None
        if not admitted.entries and plan.idle and not self.engine.has_work() \
                and not self.stopping:
            self._wait_idle(admitted.last_ids)
        return admitted.entries

    def _requeue_orphans(self) -> None:
        """Entries pending with this worker id that this process does not run go back to the
        queue consumer, where admission hands them out again: a read whose reply was lost
        when Redis went away mid-call (never started), or jobs of an earlier process with the
        same id (restarted at once, its heartbeat never gone, so nobody reclaimed them). The
        XCLAIM counts a delivery: the next worker resumes after what was streamed, as after a
        reclaim. Checked only with the outbox empty, so an ended job's unwritten XACK is never
        mistaken for an orphan."""
        self._next_orphan_check = time.monotonic() + self.config.orphan_idle_s / 2
        if not self.link.ready() or not self._groups_ready:
            return
        mine = {job.delivery.entry_id for job in self.active.values()}
        idle_ms = int(self.config.orphan_idle_s * 1000)
        try:
            for stream in (self.consumer.shared, self.consumer.routed):
                rows = self.link.call(self.redis.xpending_range, stream, GROUP, min="-",
                                      max="+", count=256, consumername=self.worker_id,
                                      idle=idle_ms)
                orphans = [row["message_id"] for row in rows
                           if row["message_id"].decode() not in mine]
                if orphans:
                    self.link.call(self.redis.xclaim, stream, GROUP, QUEUE_CONSUMER, idle_ms,
                                   orphans)
                    self.log.warning(
                        "job.requeued", stream=stream, count=len(orphans),
                        narration=f"Put {len(orphans)} entries of {stream} back in the queue: "
                        "pending with this worker id, run by no one here (an earlier process "
                        "of this id, or a reply lost to Redis)",
                    )
        except (RedisDown, redis.ResponseError):
            return

    def _wait_idle(self, last_ids: dict[str, str]) -> None:
        """Wait up to `block_ms` for a new entry; if none came, the next poll only waits."""
        try:
            arrived = self.link.call(self.admission.wait, last_ids, self.config.block_ms)
        except RedisDown:
            return
        self._quiet_since = None if arrived else last_ids

    def _cancel(self, job: ActiveJob) -> None:
        job.cancelled = True
        self.engine.abort(job.job_id)
        self.log.info("job.cancelling", job_id=job.job_id, session_id=job.job.session_id,
                      narration=f"Cancelling job {short(job.job_id)} at the client's request")

    # ----- admission --------------------------------------------------------------------------

    def _admit(self, entries: list[Entry]) -> None:
        deliveries: list[Delivery] = []
        for entry in entries:
            parsed = parse_entry(entry)
            if isinstance(parsed, Rejection):
                self._reject(parsed)
            elif isinstance(parsed, Control):
                self._control(parsed)
            else:
                deliveries.append(parsed)
        if not deliveries:
            return
        answered = self._already_answered(deliveries)
        for delivery, done in zip(deliveries, answered, strict=True):
            job = delivery.job
            log = self.log.bind(job_id=job.job_id, session_id=job.session_id)
            if done:
                log.info("job.duplicate", narration=f"Job {short(job.job_id)} was already "
                         "answered: acknowledged without recomputing")
                self.publisher.acknowledge(delivery.stream, delivery.entry_id)
            elif job.job_id in self.active:
                log.info("job.duplicate", narration=f"Job {short(job.job_id)} is already "
                         "running here: acknowledged the duplicate entry")
                self.publisher.acknowledge(delivery.stream, delivery.entry_id)
            elif delivery.attempt > self.config.max_deliveries:
                self._fail(delivery, TOO_MANY_DELIVERIES,
                           f"delivered {delivery.attempt} times; the limit is "
                           f"{self.config.max_deliveries}", dead=True)
            elif job.model != self.model.name:
                self._fail(delivery, UNKNOWN_MODEL,
                           f"model {job.model!r} is not served on this stream "
                           f"(worker serves {self.model.name!r})", dead=True)
            elif self._past_deadline(delivery):
                self._fail(delivery, DEADLINE_EXCEEDED,
                           f"still queued at its deadline ({delivery.deadline_ms:.0f} ms "
                           f"since the epoch, enqueued at {delivery.enqueued_ms}): never "
                           "started")
            else:
                self._start(delivery, log)

    @staticmethod
    def _past_deadline(delivery: Delivery) -> bool:
        deadline = delivery.deadline_ms
        return deadline is not None and time.time() * 1000 >= deadline

    def _check_deadlines(self) -> None:
        """End the running jobs past their deadline (finish_reason `deadline`). Only jobs
        that have one are looked at: most have none, and this runs every step."""
        now_ms = time.time() * 1000
        for job_id, deadline_ms in list(self._deadlines.items()):
            job = self.active.get(job_id)
            if job is None:
                del self._deadlines[job_id]  # ended meanwhile
                continue
            if now_ms >= deadline_ms and job.finish_reason is None and not job.cancelled:
                del self._deadlines[job_id]
                job.cancelled = True  # no cancel flag read for it any more
                self.engine.abort(job.job_id, "deadline")
                self.log.info("job.deadline", job_id=job.job_id, session_id=job.job.session_id,
                              narration=f"Job {short(job.job_id)} reached its deadline: "
                              "ending it (finish_reason deadline)")

    def _already_answered(self, deliveries: list[Delivery]) -> list[bool]:
        """Whether each job's output stream already ends with `done` (or `error`)."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery in deliveries:
            pipe.xrevrange(self.keys.out(delivery.job.job_id), count=1)
        try:
            replies = self.link.call(pipe.execute, raise_on_error=False)
        except RedisDown:
            return [False] * len(deliveries)  # at worst an answer is computed twice
        # An error (a key of another type) counts as not answered: the job's own writes fail
        # and end it (`_unwritable`).
        return [isinstance(r, list) and bool(r) and r[0][1].get(b"event") in (b"done", b"error")
                for r in replies]

    def _start(self, delivery: Delivery, log) -> None:
        job = delivery.job
        streamed = self._streamed(delivery)
        ended = None  # a resumed job whose earlier attempt had already reached its end
        try:
            request = build_request(job, self.tokenizer, self.engine.max_model_len,
                                    self.grammars, delivery.enqueued_ms)
            prompt_ids = request.prompt_token_ids
            active = ActiveJob.start(delivery, len(prompt_ids), self.tokenizer)
            active.deadline_ms = delivery.deadline_ms
            if active.deadline_ms is not None:
                self._deadlines[job.job_id] = active.deadline_ms
            if streamed is not None and streamed.token_ids:
                active.resume(streamed)
                request = resumed_request(request, streamed)
                if request.grammar is not None:  # the matcher takes the tokens streamed before
                    request.grammar = after_tokens(request.grammar, streamed.token_ids)
                ended = self._resumed_end(active, request)
            if ended is None:
                self.engine.add(request)
        except (TokenizerError, RequestError) as exc:
            self._fail(delivery, INVALID_REQUEST, str(exc))
            return
        self.active[job.job_id] = active
        self.publisher.event(job.job_id, "queued", {
            "position": max(0, self.engine.stats().waiting - 1), "queue_depth": len(self.active)})
        self.publisher.opened(job.job_id)  # after the first event: the stream exists then
        started = {"worker_id": self.worker_id, "attempt": delivery.attempt}
        if streamed is not None and streamed.token_ids:  # nothing streamed: a plain restart
            started["resumed_from"] = streamed.next_index
        self.publisher.event(job.job_id, "started", started)
        self._hold_session(job.session_id)
        if ended is not None:
            self._on_output(active, StepOutput(job.job_id, [], finish_reason=ended))
        again = f", attempt {delivery.attempt}" if delivery.attempt > 1 else ""
        if streamed is not None and streamed.token_ids:
            again += f", resumed after the {streamed.next_index} tokens already streamed"
        log.info(
            "job.started",
            narration=f"Started job {short(job.job_id)}: {len(prompt_ids)} prompt tokens, "
            f"up to {job.sampling.max_tokens} new, waited {active.queue_ms:.0f} ms in the queue"
            f"{again}",
            prompt_tokens=len(prompt_ids), attempt=delivery.attempt,
        )

    def _streamed(self, delivery: Delivery) -> Streamed | None:
        """What earlier attempts of a redelivered job streamed (None on a first delivery, or
        when Redis cannot say: the job then starts over, as a client of v1 expects)."""
        if delivery.attempt <= 1:
            return None
        try:
            entries = self.link.call(self.redis.xrange, self.keys.out(delivery.job.job_id))
        except (RedisDown, redis.ResponseError):
            return None
        return streamed_so_far(entries)

    def _resumed_end(self, active: ActiveJob, request: Request) -> str | None:
        """The finish reason of a resumed job that has nothing left to generate."""
        if active.stop_string_hit or request.prompt_token_ids[-1] in request.stop_token_ids:
            return "stop"
        if request.max_tokens < 1 or len(request.prompt_token_ids) >= self.engine.max_model_len:
            return "length"
        return None

    def _hold_session(self, session_id: str | None) -> None:
        """Route the session's next turns here for as long as the engine keeps its KV."""
        if session_id:
            self.publisher.write("set", self.keys.session(session_id), self.worker_id,
                                 ex=int(self.engine.session_ttl_s))

    def _reject(self, rejection: Rejection) -> None:
        entry = rejection.entry
        self.publisher.dead_letter(entry.stream, entry.entry_id, rejection.payload,
                                   f"{rejection.code}: {rejection.message}", rejection.job_id)
        if rejection.job_id:
            self.publisher.opened(rejection.job_id)
            self.publisher.final(rejection.job_id, "error",
                                 {"code": rejection.code, "message": rejection.message},
                                 stream=entry.stream, entry_id=entry.entry_id,
                                 consumer=self.worker_id, attempt=entry.attempt)
        else:
            self.publisher.acknowledge(entry.stream, entry.entry_id)
        self.metrics.job_failed(rejection.code)
        self.log.warning(
            "job.dead_letter", job_id=rejection.job_id, code=rejection.code,
            narration=f"Dead-lettered entry {entry.entry_id} of {entry.stream}: "
            f"{rejection.code}: {rejection.message}",
        )

    def _fail(self, delivery: Delivery, code: str, message: str, *, dead: bool = False) -> None:
        job_id = delivery.job.job_id
        if dead:
            self.publisher.dead_letter(delivery.stream, delivery.entry_id,
                                       delivery.job.model_dump_json(), f"{code}: {message}",
                                       job_id)
        self.publisher.opened(job_id)
        self._final(delivery, "error", {"code": code, "message": message})
        self.metrics.job_failed(code)
        self.log.warning(
            "job.dead_letter" if dead else "job.failed", job_id=job_id,
            session_id=delivery.job.session_id, code=code,
            narration=f"{'Dead-lettered' if dead else 'Failed'} job {short(job_id)}: "
            f"{code}: {message}",
        )

    def _control(self, control: Control) -> None:
        session_id = control.message.session_id
        freed = self.engine.end_session(session_id)
        self.publisher.acknowledge(control.entry.stream, control.entry.entry_id)
        self.log.info(
            "session.ended", session_id=session_id,
            narration=f"Ended session {session_id} at the client's request"
            + ("; its KV blocks are free" if freed else " (it held no KV here)"),
        )

    # ----- the step ---------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except DeviceLostError:
            raise  # nothing more can run here: run() hands the jobs over and exits
        except Exception as exc:  # noqa: BLE001 - out of memory or a bug: fail the jobs, not the worker
            self._engine_failed(exc)
            return
        for output in outputs:
            job = self.active.get(output.request_id)
            if job is None:
                continue
            if output.finish_reason == "error" and output.engine_fault:
                self._job_failed(job, output.error or "the engine failed this request")
                continue
            try:
                self._on_output(job, output)
            except Exception as exc:  # noqa: BLE001 - this job's text or events: fail it alone
                self._job_failed(job, f"{type(exc).__name__}: {exc}")

    def _unwritable(self, job_id: str, failure: Unwritable) -> None:
        """Redis refused a write to the job's output stream: no event of it can be read, so
        the job ends here, dead-lettered with the reason, and its entry is acknowledged."""
        job = self.active.pop(job_id, None)
        if job is not None:
            self.engine.abort(job_id)
            stream, entry_id = job.delivery.stream, job.delivery.entry_id
            payload = job.job.model_dump_json()
            self._completed()
        elif failure.stream is not None:
            stream, entry_id, payload = failure.stream, failure.entry_id, ""
        else:
            return  # a late event of a job whose final went through
        reason = f"{ENGINE_ERROR}: its output stream cannot be written: {failure.error}"
        self.publisher.dead_letter(stream, entry_id, payload, reason, job_id)
        self.publisher.acknowledge(stream, entry_id)
        self.metrics.job_failed(ENGINE_ERROR)
        self.log.error("job.unwritable", job_id=job_id, error=failure.error,
                       narration=f"Failed job {short(job_id)}: Redis refused writing its "
                       f"events ({failure.error}); dead-lettered, the others go on")

    def _job_failed(self, job: ActiveJob, message: str) -> None:
        """End one job with `engine_error` (its engine request aborted); the others go on."""
        if job.job_id not in self.active:
            return
        self.engine.abort(job.job_id)
        del self.active[job.job_id]
        self._fail(job.delivery, ENGINE_ERROR, message)
        self._completed()

    def _on_output(self, job: ActiveJob, output: StepOutput) -> None:
        if output.finish_reason == "error":  # its grammar failed to compile or to go on
            del self.active[job.job_id]
            self._fail(job.delivery, INVALID_REQUEST, output.error or "grammar failed")
            return
        first = job.first_token_at is None and bool(output.new_token_ids)
        for kind, data in job.push(output):
            if kind == "done":
                self._final(job.delivery, kind, data)
            else:
                self.publisher.event(job.job_id, kind, data)
        if first and job.cached_tokens:
            whose = f"session {job.job.session_id}" if job.job.session_id else "the prefix cache"
            self.log.info(
                "session.reused" if job.job.session_id else "prefix.reused",
                job_id=job.job_id, session_id=job.job.session_id, cached_tokens=job.cached_tokens,
                narration=f"Reused {job.cached_tokens} cached tokens of {whose} "
                f"(of {job.prompt_tokens} prompt tokens)",
            )
        if job.stop_string_hit and not output.finished:
            self.engine.abort(job.job_id)
        if job.finish_reason is not None:
            self._finish(job)

    def _final(self, delivery: Delivery, kind: str, data: dict) -> None:
        """A job's `done` or `error`, and its acknowledgement: written only while this worker
        still owns the delivery (publisher.final), so a job gets at most one final event."""
        self.publisher.final(delivery.job.job_id, kind, data, stream=delivery.stream,
                             entry_id=delivery.entry_id, consumer=self.worker_id,
                             attempt=delivery.attempt)

    def _finish(self, job: ActiveJob) -> None:
        self._hold_session(job.job.session_id)
        del self.active[job.job_id]
        self.jobs_done += 1
        self._completed()
        self.metrics.job_finished(job)
        total = time.monotonic() - job.started_at
        tokens = len(job.completion_ids)
        self.log.info(
            "job.finished", job_id=job.job_id, session_id=job.job.session_id,
            finish_reason=job.finish_reason, completion_tokens=tokens,
            narration=f"Finished job {short(job.job_id)} ({job.finish_reason}): {tokens} tokens "
            f"in {total:.2f} s ({tokens / total if total > 0 else 0:.1f} tok/s)",
        )

    def _engine_failed(self, exc: Exception) -> None:
        self.log.error(
            "engine.failed", error=repr(exc),
            narration=f"Engine step failed ({type(exc).__name__}: {exc}); failing its "
            f"{len(self.active)} jobs, the worker goes on",
        )
        for job in list(self.active.values()):
            self.engine.abort(job.job_id)
            self._fail(job.delivery, ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            del self.active[job.job_id]
        self._drain_engine()

    def _device_lost(self, exc: DeviceLostError) -> int:
        """The device cannot run anything more: write what is queued, hand the running jobs
        over (claimable at once by the others, whose reclaim resumes them after the tokens
        already streamed), remove the heartbeat, and return EXIT_DEVICE_LOST."""
        self.liveness.stop()
        self.log.critical(
            "worker.device_lost", error=str(exc),
            narration=f"The device failed for good ({exc}): handing {len(self.active)} jobs "
            f"over to other workers and exiting with status {EXIT_DEVICE_LOST} to be restarted",
        )
        entries = [(job.delivery.stream, job.delivery.entry_id) for job in self.active.values()]
        self.active.clear()
        self.publisher.drain(5.0)
        try:
            if entries:
                self.link.call(self.consumer.release, entries)
            left = self.link.call(self.redis.xlen, self.consumer.routed)
            self.link.call(self.heartbeat.remove, self.redis, keep_entry=left > 0)
        except RedisDown:
            pass  # the heartbeat expires and the jobs are reclaimed after --reclaim-idle
        return EXIT_DEVICE_LOST

    # ----- upkeep -----------------------------------------------------------------------------

    def _completed(self) -> None:
        """Count a job's end for the throughput the heartbeat reports (queue ETAs use it)."""
        now = time.monotonic()
        self._completions.append(now)
        if len(self._completions) > 256 or now - self._completions[0] > 60:
            self._completions = [t for t in self._completions[-256:] if now - t <= 60]

    def jobs_per_s(self, now: float) -> float:
        """Jobs ended per second over the last minute (at most the last 256)."""
        recent = [t for t in self._completions if now - t <= 60]
        if not recent:
            return 0.0
        return len(recent) / max(now - recent[0], 1.0)

    def _maintain(self, now: float) -> None:
        # The liveness thread (started by run()) writes the heartbeat from the numbers handed
        # over here; a worker driven turn by turn without it (tests) beats from its loop.
        threaded = self.liveness.running
        due = now >= self._next_snapshot if threaded else self.heartbeat.due(now)
        if due and (threaded or self.link.ready()):
            self._next_snapshot = now + self.config.heartbeat_s / 2
            stats = self.engine.stats()
            live = {
                "state": "draining" if self.stopping else "serving",
                "active_jobs": len(self.active),
                "jobs_done": self.jobs_done,
                "kv_blocks_used": stats.kv_blocks_used,
                "kv_blocks_total": stats.kv_blocks_total,
                "kv_blocks_cached": stats.kv_blocks_cached,
                "sessions": stats.sessions,
                "jobs_per_s": round(self.jobs_per_s(now), 3),
            }
            self.metrics.observe_engine(stats, len(self.active))
            self.liveness.update(live, f"{live['state']} {self.model.name}: {len(self.active)} "
                                       f"jobs, KV {stats.kv_blocks_used}/{stats.kv_blocks_total} "
                                       "blocks")  # fmt: skip
            if not threaded:
                self.liveness.tick(now)
        if now >= self._next_reclaim and self.link.ready():
            self._next_reclaim = now + self.config.reclaim_every_s
            capacity = self._capacity()
            if capacity:
                try:
                    entries = self.link.call(self.consumer.reclaim, capacity)
                except RedisDown:
                    return
                for entry in entries:
                    self.log.warning(
                        "job.reclaimed", previous_worker=entry.reclaimed_from,
                        narration=f"Reclaimed entry {entry.entry_id} of {entry.stream} from "
                        f"dead worker {entry.reclaimed_from} (delivery {entry.attempt})",
                    )
                if entries:
                    self._admit(entries)

