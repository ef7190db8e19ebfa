"""The worker's liveness, kept by a thread of its own: heartbeats and the systemd watchdog go on
however long one engine step takes, and a loop that is truly stuck is noticed.

The heartbeat key's TTL is a few beats; the main loop may spend longer than that in one engine
step (a long prefill chunk on a busy CPU), and a worker whose key lapses is taken for dead and
its jobs are reclaimed by others. So the key is written here, every `interval_s`, from the
latest snapshot the loop handed over (`update`), not from the loop itself. The loop reports
each turn (`progress`); when no turn has ended for `stall_timeout_s`, the loop is stuck: the
thread stops beating, deletes the heartbeat key so that other workers reclaim the jobs at once,
and ends the process with `STALL_EXIT_STATUS` so that the service manager restarts it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from worker.heartbeat import Heartbeat
from worker.log import get_logger
from worker.systemd_notify import SystemdNotifier

STALL_EXIT_STATUS = 70  # EX_SOFTWARE: the loop made no progress for --stall-timeout seconds


def _exit_now() -> None:
    os._exit(STALL_EXIT_STATUS)  # the main thread is stuck: a normal exit would wait for it


class Liveness:
    """Beats from a daemon thread; the loop calls `progress()` each turn and `update()` with
    the live numbers of the heartbeat. `on_stall` ends the process (tests replace it)."""

    def __init__(self, client: redis.Redis, heartbeat: Heartbeat, notifier: SystemdNotifier, *,
                 stall_timeout_s: float = 300.0,
                 on_stall: Callable[[], None] = _exit_now) -> None:  # fmt: skip
        self.redis = client
        self.heartbeat = heartbeat
        self.notifier = notifier
        self.stall_timeout_s = stall_timeout_s
        self.on_stall = on_stall
        self.log = get_logger()
        self._live: dict[str, Any] = {"state": "starting"}
        self._status = "starting"
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._redis_ok = True
        self._thread = threading.Thread(target=self._run, name="orcd-liveness", daemon=True)
        self.beats = 0  # heartbeats written

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._last_progress = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (the worker removes its heartbeat itself on a clean stop)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def progress(self) -> None:
        """The loop finished a turn (an attribute write: no lock needed)."""
        self._last_progress = time.monotonic()

    def update(self, live: dict[str, Any], status: str) -> None:
        """The numbers the next heartbeats carry, and the systemd status line."""
        self._live, self._status = live, status

    def beat_soon(self) -> None:
        """Beat at the next tick (after a reconnect: Redis may have lost the key)."""
        self.heartbeat.due_now()

    # ----- the thread ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Beat if one is due (the thread calls this; so does a loop run without the thread)."""
        if self.heartbeat.due(now):
            self._beat(now)

    def _run(self) -> None:
        period = min(0.1, self.heartbeat.interval_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            stalled_for = now - self._last_progress
            if stalled_for > self.stall_timeout_s:
                self._stalled(stalled_for)
                return
            self.tick(now)

    def _beat(self, now: float) -> None:
        live, status = self._live, self._status
        try:
            self.heartbeat.beat(self.redis, live, now)
        except redis.RedisError as exc:
            self.heartbeat.postpone(now)
            if self._redis_ok:
                self._redis_ok = False
                self.log.warning("heartbeat.failed", error=str(exc),
                                 narration=f"Heartbeat not written: {exc}; generation goes on")
            if self.notifier.ready_sent:  # the loop turns: feed the watchdog without Redis
                self.notifier.watchdog(f"{status}; Redis unreachable")
            return
        self.beats += 1
        if not self._redis_ok:
            self._redis_ok = True
            self.log.info("heartbeat.restored", narration="Heartbeat written again")
        self.notifier.alive(status)  # READY=1 after the first heartbeat, then WATCHDOG=1

    def _stalled(self, stalled_for: float) -> None:
        self.log.error(
            "worker.stalled", stalled_s=round(stalled_for, 1),
            narration=f"The worker loop made no progress for {stalled_for:.0f} s (limit "
            f"{self.stall_timeout_s:.0f} s): heartbeat removed so that others reclaim its "
            f"jobs; exiting with status {STALL_EXIT_STATUS}",
        )
        try:
            self.heartbeat.remove(self.redis, keep_entry=True)
        except redis.RedisError:
            pass  # the key lapses by its TTL anyway
        self.notifier.stopping("stalled")
        self.on_stall()
