"""The worker's Redis connection and its view of whether Redis is there.

The daemon never blocks on a lost Redis: every call goes through `RedisLink.call`, which
turns redis-py's ConnectionError/TimeoutError into `RedisDown`, narrates the loss once, and
refuses further calls until the next retry time (exponential backoff, capped). Generation
goes on meanwhile; the publisher keeps its writes until a call succeeds again, and then the
link narrates the reconnect and runs `on_reconnect` (re-create consumer groups: a Redis that
restarted without persistence has lost them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobs import redis_url
from worker.log import get_logger

T = TypeVar("T")
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# Blocking reads last at most ~100 ms; a call that takes longer than this means a network
# partition, and the loop should go back to generating.
SOCKET_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 1.0


class RedisDown(Exception):
    """Redis is unreachable right now; the caller keeps its work and tries again later."""


def connect(url: str) -> redis.Redis:
    """A client for the worker (any URL of jobs/redis_url.py, Sentinel included): no redis-py
    retries (redis-py >= 6 retries 3 times with exponential backoff by default, which would
    stall generation), short timeouts."""
    return redis_url.connect(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )


class RedisLink:
    """One client plus up/down state with backoff; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        on_reconnect: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = client
        self.on_reconnect = on_reconnect
        self.up = True
        self._clock = clock
        self._backoff = BACKOFF_MIN_S
        self._retry_at = 0.0
        self._lost_at = 0.0
        self._log = get_logger()

    def ready(self) -> bool:
        """Whether a call may be tried now (Redis is up, or its retry time has come)."""
        return self.up or self._clock() >= self._retry_at

    def seconds_to_retry(self) -> float:
        return 0.0 if self.up else max(0.0, self._retry_at - self._clock())

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args) against Redis, or `RedisDown` (also without trying, while backing off)."""
        if not self.ready():
            raise RedisDown("waiting to reconnect")
        was_down = not self.up
        try:
            if was_down:
                self.up = True  # on_reconnect's own calls must go through
                if self.on_reconnect is not None:
                    self.on_reconnect()
            result = fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.up = True
            self._lost(exc, was_down)
            raise RedisDown(str(exc)) from None
        if was_down:
            self._log.info(
                "redis.reconnected",
                narration=f"Reconnected to Redis after {self._clock() - self._lost_at:.1f} s",
                down_s=round(self._clock() - self._lost_at, 3),
            )
            self._backoff = BACKOFF_MIN_S
        return result

    def _lost(self, exc: Exception, was_down: bool) -> None:
        now = self._clock()
        if not was_down:
            self._lost_at = now
            self._backoff = BACKOFF_MIN_S
            self._log.warning(
                "redis.lost",
                narration=f"Lost Redis ({exc}); generation goes on, events are kept until "
                "it is back",
                error=str(exc),
            )
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self.up = False
        self._retry_at = now + self._backoff
