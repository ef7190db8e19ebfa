"""The gateway's shared state: its configuration, Redis client, limiter, metrics and caches.

Everything here is a cache of what Redis holds (live workers, for about a second) or of what
never changes (a model's token pieces for logprobs), so gateways stay interchangeable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.auth import ApiKeys, Limits
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.translate import Choice, TokenPieces
from jobs.async_client import AsyncOrcdClient
from jobs.client import serving_workers
from jobs.keys import JOB_FIELD
from jobs.protocol import encode_job

DEFAULT_PORT = 8000
DEFAULT_BODY_BYTES = 4 * 1024 * 1024  # a job holds at most 1M characters of prompt
DEFAULT_FILE_BYTES = 100 * 1024 * 1024
DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 24 * 3600.0
BATCH_PRIORITY = -100  # batch lines yield to interactive requests (priority 0)
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 30.0  # a blocked XREAD waits 0.5 s: longer means a dead connection


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What `orcd gateway` was started with (see its --help)."""

    redis_url: str = "redis://localhost:6379/0"
    prefix: str = "orcd"
    api_keys: ApiKeys | None = None  # None: --no-auth
    default_limits: Limits = Limits()
    max_body_bytes: int = DEFAULT_BODY_BYTES
    max_file_bytes: int = DEFAULT_FILE_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    models_dir: str | None = None  # GGUF files, for logprobs' token texts
    files_dir: str | None = None  # None: file contents live in Redis
    batch_priority: int = BATCH_PRIORITY
    batch_lease_s: float = 10.0
    batch_window: int = 256  # lines of one batch in flight at once
    batch_poll_s: float = 1.0
    worker_cache_s: float = 1.0
    gateway_id: str = "gateway"


class Gateway:
    """One gateway process's handle on Redis and its caches."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = AsyncOrcdClient(config.redis_url, prefix=config.prefix,
                                      socket_connect_timeout=CONNECT_TIMEOUT_S,
                                      socket_timeout=REPLY_TIMEOUT_S)
        self.redis = self.client.redis
        self.keys = self.client.keys
        self.limiter = RateLimiter(self.redis, self.keys)
        self.metrics = GatewayMetrics()
        self._workers: tuple[float, dict[str, dict]] = (-1e9, {})
        self._pieces: dict[str, TokenPieces] = {}
        self._pieces_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.close()

    async def live_workers(self, *, fresh: bool = False) -> dict[str, dict]:
        """Live workers' heartbeats, read at most once per `worker_cache_s`."""
        at, workers = self._workers
        if fresh or time.monotonic() - at > self.config.worker_cache_s:
            workers = await self.client.workers()
            self._workers = (time.monotonic(), workers)
        return workers

    async def models(self) -> dict[str, float]:
        """Models that live workers take jobs for, with the earliest start time of each."""
        served: dict[str, float] = {}
        for info in (await self.live_workers()).values():
            model = info.get("model")
            if model and info.get("state") != "draining":
                served[model] = min(served.get(model, float("inf")),
                                    info.get("started_at", 0.0))
        return served

    async def check_model(self, model: str) -> None:
        """404 for a model no worker has served, 503 for one whose workers are all gone."""
        if serving_workers(model, await self.live_workers()):
            return
        if serving_workers(model, await self.live_workers(fresh=True)):
            return
        known = {json.loads(raw).get("model")
                 for raw in (await self.redis.hgetall(self.keys.workers)).values()}
        if model in known:
            raise APIError(503, f"no live worker serves the model {model} now; retry later",
                           "model", "model_not_available", {"Retry-After": "5"})
        raise APIError(404, f"The model {model} does not exist or no worker serves it",
                       "model", "model_not_found")

    async def token_pieces(self, model: str) -> TokenPieces:
        """Each token id's bytes, for logprobs: from the model's GGUF on this host."""
        async with self._pieces_lock:
            if model not in self._pieces:
                self._pieces[model] = await asyncio.to_thread(_load_pieces, model,
                                                              self.config.models_dir)
        return self._pieces[model]

    async def submit(self, choices: Sequence[Choice], source: str = "request") -> None:
        """Put the jobs on their streams (a session's job on its holder's) in one round trip."""
        streams = [await self.client.stream_for(c.job.model, c.job.session_id)
                   if c.job.session_id else self.keys.jobs(c.job.model) for c in choices]
        async with self.redis.pipeline(transaction=False) as pipe:
            for choice, stream in zip(choices, streams, strict=True):
                pipe.xadd(stream, {JOB_FIELD: encode_job(choice.job)})
            await pipe.execute()
        self.metrics.jobs.labels(source).inc(len(choices))

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.set(self.keys.cancel(job_id), 1, ex=3600)
                await pipe.execute()

    async def redis_ok(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False


def _load_pieces(model: str, models_dir: str | None) -> TokenPieces:
    from loader.registry import ModelNotFoundError, resolve_model
    from tokenizer.tokenizer import load_tokenizer

    try:
        path = resolve_model(model, models_dir)
    except ModelNotFoundError as exc:
        raise APIError(400, f"logprobs need the model's GGUF file on the gateway host "
                       f"(--models-dir): {exc}", "logprobs", "logprobs_unavailable") from None
    pieces = load_tokenizer(path).decode_table.pieces
    return pieces.__getitem__
