"""A thread that sees new queue entries at once, so that a busy worker starts them without
waiting for its loop's next turn.

While the engine has work the loop's admission read goes with the publisher thread's sends,
once a turn, and a turn of a worker whose engine runs in a process of its own lasts until
the child's next outputs (worker/engine_process.py): a job XADDed just after a read waited
that turn, the read's round trip and the next turn before it started (queue p50 13-23 ms,
bench/NOTES.md "Session 13"). This thread blocks on the worker's job streams with
`Admission.wait` (on a connection of its own from the client's pool) and calls `on_arrival`
when an entry newer than the last one it saw comes: the worker wakes its wait on the child, and the turn that follows
sends the admission read. It reads no job and claims nothing: admission stays the loop's, with
its capacity and priorities. Redis errors are retried after a pause, never raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis

from worker.admission import Admission
from worker.log import get_logger

RETRY_S = 1.0  # after a failed read (Redis away): the loop's link narrates the loss


class QueueWatcher:
    """`start()`, then `on_arrival()` is called from the thread for each new batch of entries;
    `armed()` (read by the thread) says whether the worker wants to hear (room, engine busy);
    `stop()` ends the thread within `block_ms`."""

    def __init__(self, admission: Admission, on_arrival: Callable[[], None],
                 armed: Callable[[], bool], block_ms: int = 100) -> None:
        self.admission = admission
        self.on_arrival = on_arrival
        self.armed = armed
        self.block_ms = block_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.arrivals = 0  # batches of new entries seen (tests, metrics)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orcd-queue-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.block_ms / 1000 + 1.0)
            self._thread = None

    def _run(self) -> None:
        last: dict[str, str] | None = None
        log = get_logger()
        while not self._stop.is_set():
            try:
                armed = self.armed()
            except Exception:  # noqa: BLE001 - the worker's state mid-change: ask again
                armed = False
            if not armed:
                # Nothing to wake: the loop is idle (it blocks on the streams itself) or full;
                # what comes meanwhile its own reads find. Armed again, watch from then on.
                last = None
                self._stop.wait(self.block_ms / 1000 / 10)
                continue
            try:
                if last is None:
                    last = self.admission.tails()  # not `$`: see Admission.tails
                newest = self.admission.wait(last, self.block_ms, count=64)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._stop.wait(RETRY_S)
                continue
            except redis.ResponseError as exc:  # a stream of another type: the loop reports
                log.debug("queue_watch.read_failed", error=str(exc))
                self._stop.wait(RETRY_S)
                continue
            if not newest:
                continue
            last.update(newest)
            self.arrivals += 1
            self.on_arrival()
