"""The worker's heartbeat: `orcd:worker:{id}` (present while it lives, TTL a few beats) and
its entry in the `orcd:workers` hash (model, backend, device, jobs, KV use, sessions...).

The hash entry outlives a crash on purpose: it is how other workers find a dead worker's
routed stream to adopt its jobs (`worker.consumer`); they remove it once that stream is empty.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis

from jobs.keys import Keys


def orcd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orcd")
    except PackageNotFoundError:
        return "unknown"


class Heartbeat:
    """Writes the heartbeat every `interval_s`; static facts once, live numbers each beat."""

    def __init__(self, keys: Keys, worker_id: str, static: dict[str, Any], *,
                 interval_s: float = 1.0, ttl_s: float = 5.0) -> None:
        self.keys = keys
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self.static = {
            "worker_id": worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": orcd_version(),
            "started_at": time.time(),
            **static,
        }
        self._next = 0.0

    @property
    def next_at(self) -> float:
        """The monotonic time of the next beat."""
        return self._next

    def due(self, now: float) -> bool:
        return now >= self._next

    def postpone(self, now: float) -> None:
        """A beat failed: try again one interval later."""
        self._next = now + self.interval_s

    def due_now(self) -> None:
        """Beat at the next chance (after a reconnect: Redis may have lost the key)."""
        self._next = 0.0

    def beat(self, client: redis.Redis, live: dict[str, Any], now: float) -> None:
        info = json.dumps({**self.static, **live, "at": time.time()})
        pipe = client.pipeline(transaction=True)
        pipe.set(self.keys.worker(self.worker_id), info, px=self.ttl_ms)
        pipe.hset(self.keys.workers, self.worker_id, info)
        pipe.execute()
        self._next = now + self.interval_s

    def remove(self, client: redis.Redis, *, keep_entry: bool = False) -> None:
        """Stop beating; `keep_entry` leaves the hash entry so others adopt the routed stream."""
        pipe = client.pipeline(transaction=True)
        pipe.delete(self.keys.worker(self.worker_id))
        if not keep_entry:
            pipe.hdel(self.keys.workers, self.worker_id)
        pipe.execute()
