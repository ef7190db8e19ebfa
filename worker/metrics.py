"""Prometheus metrics of one worker (`orcd worker --metrics-port N`), on its own registry.

The daemon calls `job_finished`, `job_failed`, `engine_event`, `redis_reconnected` and, once
a heartbeat, `observe_engine`; queue depth and pending entries per stream are read from Redis
only when Prometheus scrapes (`StreamCollector`), so the loop pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpu.events import EngineEvent
from jobs.keys import GROUP
from worker.job_runner import ActiveJob

if TYPE_CHECKING:
    from gpu.engine import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class WorkerMetrics:
    """Every metric the worker exports; names follow Prometheus conventions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs = Counter("orcd_jobs", "Jobs ended, by outcome: a finish reason (stop, "
                            "length, cancelled) or an error code", ["outcome"], registry=r)
        self.tokens_generated = Counter("orcd_tokens_generated", "Completion tokens generated",
                                        registry=r)
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens of finished jobs; "
                                     "cached=true were reused from the KV cache", ["cached"],
                                     registry=r)
        self.ttft = Histogram("orcd_time_to_first_token_seconds", "Job start to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("orcd_job_duration_seconds", "Job start to done",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("orcd_job_queue_seconds", "Enqueue to start of a job",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.decode_rate = Histogram("orcd_decode_tokens_per_second", "Decode speed of each "
                                     "finished job (after its first token)",
                                     buckets=RATE_BUCKETS, registry=r)
        self.active_jobs = Gauge("orcd_active_jobs", "Jobs this worker is running", registry=r)
        self.sequences = Gauge("orcd_sequences", "Engine sequences, by state (running, "
                               "waiting)", ["state"], registry=r)
        self.kv_blocks_used = Gauge("orcd_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_cached = Gauge("orcd_kv_blocks_cached", "KV blocks held by the prefix "
                                      "cache", registry=r)
        self.kv_blocks_total = Gauge("orcd_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.sessions = Gauge("orcd_sessions", "Sessions holding KV blocks", registry=r)
        self.evictions = Counter("orcd_session_evictions", "Sessions evicted to make room",
                                 registry=r)
        self.expirations = Counter("orcd_session_expirations", "Sessions expired after their "
                                   "idle TTL", registry=r)
        self.preemptions = Counter("orcd_preemptions", "Running sequences preempted "
                                   "(recomputed later)", registry=r)
        self.reconnects = Counter("orcd_redis_reconnects", "Reconnections to Redis after a "
                                  "loss", registry=r)

    # ----- what the daemon reports ------------------------------------------------------------

    def job_finished(self, job: ActiveJob, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        completion = len(job.completion_ids)
        self.jobs.labels(outcome=job.finish_reason or "stop").inc()
        self.tokens_generated.inc(completion)
        self.prompt_tokens.labels(cached="true").inc(job.cached_tokens)
        self.prompt_tokens.labels(cached="false").inc(job.prompt_tokens - job.cached_tokens)
        self.latency.observe(now - job.started_at)
        self.queue_wait.observe(job.queue_ms / 1000)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.started_at)
            decode_s = now - job.first_token_at
            if completion > 1 and decode_s > 0:
                self.decode_rate.observe((completion - 1) / decode_s)

    def job_failed(self, code: str) -> None:
        self.jobs.labels(outcome=code).inc()

    def engine_event(self, event: EngineEvent) -> None:
        counter = {"preempted": self.preemptions, "session_evicted": self.evictions,
                   "session_expired": self.expirations}.get(event.kind)
        if counter is not None:
            counter.inc()

    def redis_reconnected(self) -> None:
        self.reconnects.inc()

    def observe_engine(self, stats: EngineStats, active_jobs: int) -> None:
        """Gauges from `Engine.stats()`; called once a heartbeat."""
        self.active_jobs.set(active_jobs)
        self.sequences.labels(state="running").set(stats.running)
        self.sequences.labels(state="waiting").set(stats.waiting)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_cached.set(stats.kv_blocks_cached)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.sessions.set(stats.sessions)

    # ----- serving ----------------------------------------------------------------------------

    def watch_streams(self, client: redis.Redis, streams: Callable[[], list[str]]) -> None:
        """Export queue depth and pending entries of `streams()` at each scrape."""
        self.registry.register(StreamCollector(client, streams))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve /metrics from a daemon thread (prometheus-client's own HTTP server)."""
        start_http_server(port, addr=host, registry=self.registry)


class StreamCollector(Collector):
    """`orcd_queue_depth` (entries not yet delivered to the group) and `orcd_pending_jobs`
    (delivered, not acknowledged) per job stream, read with XINFO GROUPS at scrape time."""

    def __init__(self, client: redis.Redis, streams: Callable[[], list[str]]) -> None:
        self.client = client
        self.streams = streams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("orcd_queue_depth", "Entries of a job stream not yet read "
                                  "by any worker (consumer group lag)", labels=["stream"])
        pending = GaugeMetricFamily("orcd_pending_jobs", "Entries of a job stream read but "
                                    "not acknowledged", labels=["stream"])
        for stream in self.streams():
            try:
                groups = self.client.xinfo_groups(stream)
            except redis.RedisError:
                continue  # no stream yet, or Redis away: nothing to report for it
            for group in groups:
                if _text(group["name"]) != GROUP:
                    continue
                lag = group.get("lag")
                if lag is None:
                    # Redis < 7, or deleted entries in the range (workers XDEL what they
                    # acknowledge): the stream then holds only unread and pending entries.
                    lag = max(0, self.client.xlen(stream) - group["pending"])
                depth.add_metric([stream], lag)
                pending.add_metric([stream], group["pending"])
        yield depth
        yield pending


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
