"""Prometheus metrics of one gateway (`GET /metrics`), on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300, 600)


class GatewayMetrics:
    """Requests by endpoint and status, their latency, open streams, tokens and jobs."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("orcd_gateway_requests", "HTTP requests answered, by endpoint "
                                "and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("orcd_gateway_request_duration_seconds", "Request received to "
                                 "response ended (streams: to their last chunk)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.streams = Gauge("orcd_gateway_streams_in_flight", "SSE streams open now",
                             registry=r)
        self.jobs = Counter("orcd_gateway_jobs_submitted", "Jobs put on the queue, by source "
                            "(request or batch)", ["source"], registry=r)
        self.completion_tokens = Counter("orcd_gateway_completion_tokens", "Completion tokens "
                                         "of finished jobs", registry=r)
        self.rate_limited = Counter("orcd_gateway_rate_limited", "Requests refused by a "
                                    "per-key limit, by limit", ["limit"], registry=r)
