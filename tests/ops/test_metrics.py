"""WorkerMetrics without a model: what each daemon hook moves, Prometheus naming, and the
scrape-time stream gauges on fakeredis (the scrape of a real worker is in test_stack.py)."""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu.engine import EngineStats
from gpu.events import EngineEvent
from jobs.keys import GROUP, Keys
from worker.metrics import WorkerMetrics


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finished_job(**fields):
    job = dict(finish_reason="length", completion_ids=[1, 2, 3, 4, 5], prompt_tokens=40,
               cached_tokens=32, started_at=100.0, first_token_at=100.5, queue_ms=250.0)
    return SimpleNamespace(**{**job, **fields})


def test_a_finished_job_moves_counters_and_histograms():
    metrics = WorkerMetrics()
    metrics.job_finished(finished_job(), now=101.5)
    metrics.job_failed("invalid_job")
    got = samples(metrics)
    assert got["orcd_jobs_total", (("outcome", "length"),)] == 1
    assert got["orcd_jobs_total", (("outcome", "invalid_job"),)] == 1
    assert got["orcd_tokens_generated_total", ()] == 5
    assert got["orcd_prompt_tokens_total", (("cached", "true"),)] == 32
    assert got["orcd_prompt_tokens_total", (("cached", "false"),)] == 8
    assert got["orcd_time_to_first_token_seconds_sum", ()] == 0.5
    assert got["orcd_job_duration_seconds_sum", ()] == 1.5
    assert got["orcd_job_queue_seconds_sum", ()] == 0.25
    assert got["orcd_decode_tokens_per_second_sum", ()] == 4.0  # 4 tokens after the first, 1 s


def test_engine_events_reconnects_and_gauges():
    metrics = WorkerMetrics()
    for kind in ("preempted", "session_evicted", "session_evicted", "session_expired"):
        metrics.engine_event(EngineEvent(kind=kind, request_id="r", session_id="s",
                                         num_blocks=1, num_tokens=16, reason="pool"))
    metrics.redis_reconnected()
    metrics.observe_engine(EngineStats(running=3, waiting=1, kv_blocks_used=10,
                                       kv_blocks_cached=4, kv_blocks_total=100, sessions=2,
                                       block_size=16), 4)
    got = samples(metrics)
    assert got["orcd_preemptions_total", ()] == 1
    assert got["orcd_session_evictions_total", ()] == 2
    assert got["orcd_session_expirations_total", ()] == 1
    assert got["orcd_redis_reconnects_total", ()] == 1
    assert got["orcd_sequences", (("state", "running"),)] == 3
    assert (got["orcd_kv_blocks_used", ()], got["orcd_kv_blocks_total", ()]) == (10, 100)
    assert (got["orcd_sessions", ()], got["orcd_active_jobs", ()]) == (2, 4)


def test_names_follow_prometheus_conventions():
    for family in WorkerMetrics().registry.collect():
        assert family.name.startswith("orcd_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_per_second"))


def test_queue_depth_and_pending_are_read_at_scrape_time():
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    keys = Keys()
    shared, routed = keys.jobs("m"), keys.routed("m", "w1")
    r.xgroup_create(shared, GROUP, id="0", mkstream=True)
    for n in range(5):
        r.xadd(shared, {"job": str(n)})
    r.xreadgroup(GROUP, "w1", {shared: ">"}, count=2)
    metrics = WorkerMetrics()
    metrics.watch_streams(r, lambda: [shared, routed])  # routed does not exist yet: skipped
    got = samples(metrics)
    assert got["orcd_queue_depth", (("stream", shared),)] == 3
    assert got["orcd_pending_jobs", (("stream", shared),)] == 2
    assert ("orcd_queue_depth", (("stream", routed),)) not in got
