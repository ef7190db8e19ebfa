"""Everything the worker writes to Redis, sent in one MULTI/EXEC per loop iteration.

Writes are queued in order (a job's events before its XACK) and flushed together, so the
events of one engine step cost one round trip. Narration lines are queued in the same order,
so a reader of both streams sees "Started job" before the job's first token. While Redis is
away the queue keeps growing and no event is lost; narration is the exception: past
`NARRATION_BUFFER` queued lines, new ones are dropped (and counted). MULTI/EXEC makes a flush
all-or-nothing, so a retried flush never leaves half of a step behind; if EXEC ran but its
reply was lost, the retry writes the step twice,
and readers drop repeated tokens by their `index` (`jobs.protocol.EventFollower`).

The writer thread (`start_writer`, the worker's default): `flush()` then only wakes a thread
that sends, so the engine's loop goes on while Redis is written: the packing of a step's
events, their JSON (encoded at send time: a queued event's data must not be changed after),
the round trip and Redis's own time came to ~60% of the worker's host time per step at 128
jobs on SmolLM2 (bench/NOTES.md, "Worker host loop"). Order is kept: one queue, one sender.
`drain()` waits until everything queued is written (shutdown, a lost device).
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from jobs.keys import DATA_FIELD, EVENT_FIELD, GROUP, Keys
from worker.connection import RedisDown, RedisLink
from worker.log import get_logger
from worker.scripts import ScriptSet

# A job's final event, written only by the worker that owns the job's delivery: the output
# stream holds no final event yet, and the entry is pending with this consumer at this
# delivery count, or with nobody (Redis lost its pending list, or the entry). Otherwise
# another worker has taken the job over: nothing is written and 0 comes back. Then the
# output stream's TTL, XACK and XDEL, as `acknowledge`. "No final yet" looks at the last 16
# entries, not only the last: a flush replayed after its reply was lost (a Redis restart)
# re-adds the step's `token` event after the final it had already written.
# KEYS: job stream, output stream. ARGV: group, consumer, entry id, delivery count, event
# name, data JSON, output TTL (s).
_FINAL_IF_OWNER = """
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 16)) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'event' and (fields[i + 1] == 'done' or fields[i + 1] == 'error') then
      return 0
    end
  end
end
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
local entry = ok and pending[1] or nil
if entry and (entry[2] ~= ARGV[2] or tonumber(entry[4]) ~= tonumber(ARGV[4])) then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[5], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
if ok then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# A session's routing key, deleted only while it still names this worker (another worker may
# hold the session now). KEYS: the session key. ARGV: worker id.
_DEL_IF_HOLDER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A run of events (each to its job's output stream) in one call: one command, and their
# names and data in one argument, instead of one XADD each, which costs the host loop ~15 µs
# per event in redis-py (bench/NOTES.md "Worker host loop"). A refused XADD (WRONGTYPE...)
# fails alone, as in a pipeline. The newline separates because JSON text never holds one raw.
# KEYS: output streams. ARGV: the event and data field names, then "name\ndata\n" for each
# key in turn. Returns {position (from 1), error} of each refused XADD.
_XADD_EACH = """
local blob, at, refused = ARGV[3], 1, {}
for i, key in ipairs(KEYS) do
  local name_end = string.find(blob, '\\n', at, true)
  local data_end = string.find(blob, '\\n', name_end + 1, true)
  local ok, err = pcall(redis.call, 'XADD', key, '*', ARGV[1], string.sub(blob, at, name_end - 1),
                        ARGV[2], string.sub(blob, name_end + 1, data_end - 1))
  if not ok then
    refused[#refused + 1] = i
    refused[#refused + 1] = type(err) == 'table' and err.err or tostring(err)
  end
  at = data_end + 1
end
return refused
"""

NARRATION_MAXLEN = 10_000
NARRATION_BUFFER = 10_000  # lines kept while Redis is away
DEAD_MAXLEN = 100_000
MAX_OPS_PER_FLUSH = 4096
OUT_TTL_RUNNING_S = 24 * 3600  # an abandoned output stream still goes away eventually
WRITER_RETRY_S = 0.05  # the writer thread's longest sleep while writes wait for Redis
READS_LOST = object()  # pop_reads: the writer thread could not send a flush's reads


@dataclass(slots=True)
class Unwritable:
    """A write to a job's output stream that Redis refused; with the job entry when it was the
    job's final event (the job has left the worker's running set then)."""

    error: str
    stream: str | None = None
    entry_id: str | None = None


class Publisher:
    """An ordered outbox of Redis writes; `flush()` sends it when Redis is there."""

    def __init__(self, link: RedisLink, keys: Keys, *, out_ttl_s: int = 3600,
                 scripts: ScriptSet | None = None) -> None:
        self.link = link
        self.keys = keys
        self.out_ttl_s = out_ttl_s
        self._ops: deque[tuple[str, tuple, dict]] = deque()
        self._narration_queued = 0
        self.narration_dropped = 0
        self._log = get_logger()
        self.events_published = 0
        self.scripts = scripts if scripts is not None else ScriptSet(link.redis)
        self._final_script = self.scripts.add(_FINAL_IF_OWNER)
        self._release_script = self.scripts.add(_DEL_IF_HOLDER)
        self._events_script = self.scripts.add(_XADD_EACH)
        self.refused_finals: list[str] = []  # job ids whose final event another worker owns
        self._reads: list | None = None  # replies of the reads sent with the last flush
        self.unwritable: dict[str, Unwritable] = {}  # job id -> a write Redis refused
        # Held for what both the caller's thread and the writer change.
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self._next_reads = None  # reads handed to the writer for its next send
        self._thread_reads: list | object | None = None  # their replies, or READS_LOST
        self._reads_ready = threading.Event()
        # Called by the writer thread with a send's replies once they are back (`pop_reads` has
        # them too; READS_LOST when they were not sent): the worker wakes its loop's wait for
        # the engine process with it when they admitted jobs.
        self.on_reads: Callable[[list | object], None] | None = None

    def __len__(self) -> int:
        """Writes queued and not yet sent (those being sent count until they are)."""
        return len(self._ops)

    @property
    def threaded(self) -> bool:
        return self._writer is not None

    # ----- the writer thread ------------------------------------------------------------------

    def start_writer(self) -> None:
        """Send from a thread of this publisher's own from now on (module docstring). The
        thread runs in a copy of the caller's context: its log lines keep the worker's bound
        fields."""
        if self._writer is not None:
            return
        self._closing = False
        context = contextvars.copy_context()
        self._writer = threading.Thread(target=context.run, args=(self._write_loop,),
                                        name="orcd-publisher", daemon=True)
        self._writer.start()

    def stop_writer(self, timeout_s: float = 5.0) -> None:
        """Stop the writer thread (after one more attempt at what is queued); `drain` first
        to wait for everything."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._closing = True
        self._wake.set()
        writer.join(timeout_s)

    def _write_loop(self) -> None:
        while True:
            # Woken by flush(); the timeout retries what a lost Redis kept queued.
            self._wake.wait(WRITER_RETRY_S)
            self._wake.clear()
            with self._lock:
                reads, self._next_reads = self._next_reads, None
            replies = None
            try:
                sent, replies = self._send_queued(reads, alone=True)
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the thread
                sent = False
                self._log.error("publisher.failed", error=repr(exc),
                                narration=f"Sending to Redis failed ({type(exc).__name__}: "
                                f"{exc}); the writes stay queued and are tried again")
            finally:
                if reads is not None:
                    self._thread_reads = replies if replies is not None else READS_LOST
                    self._reads_ready.set()
                    if self.on_reads is not None:
                        self.on_reads(self._thread_reads)
            if self._closing:
                return
            if not sent:
                time.sleep(min(WRITER_RETRY_S, max(0.005, self.link.seconds_to_retry())))

    def drain(self, timeout_s: float) -> bool:
        """Write everything queued, from this thread or by waiting for the writer, trying for
        up to `timeout_s` while Redis is away; whether nothing is left."""
        give_up = time.monotonic() + timeout_s
        while self._ops:
            if self._writer is not None:
                self._wake.set()
                time.sleep(0.002)
            elif not self._send_queued()[0]:
                time.sleep(max(0.05, self.link.seconds_to_retry()))
            if time.monotonic() >= give_up:
                break
        return not self._ops

    # ----- queueing ---------------------------------------------------------------------------

    def write(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queue any redis-py pipeline call, e.g. write("set", key, value, ex=60)."""
        self._ops.append((method, args, kwargs))

    def event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Queue one event for `orcd:out:{job_id}` (`data` is encoded when sent: the caller
        must not change it after)."""
        self._ops.append(("event", (self.keys.out(job_id), kind, data), {}))

    def opened(self, job_id: str) -> None:
        """A job's first event was queued: give its stream a long safety TTL. Queue it after
        that event: an EXPIRE on a stream that does not exist yet does nothing (it did, and
        the output of a job whose worker died mid-run never expired)."""
        self._ops.append(("expire", (self.keys.out(job_id), OUT_TTL_RUNNING_S), {}))

    def final(self, job_id: str, kind: str, data: dict[str, Any], *, stream: str, entry_id: str,
              consumer: str, attempt: int) -> None:
        """Queue a job's `done` or `error` with its acknowledgement, written only if this
        consumer still owns the delivery (`_FINAL_IF_OWNER`): at most one final per job.
        `data` is encoded when sent, as `event`'s."""
        args = (GROUP, consumer, entry_id, attempt, kind, data, self.out_ttl_s)
        self._ops.append(("final", (stream, self.keys.out(job_id), job_id), {"args": args}))

    def release_session(self, session_id: str, worker_id: str) -> None:
        """Queue the deletion of a session's routing key if it still names `worker_id`: the
        engine no longer holds the session's KV, so its next turn goes to the shared stream."""
        self._ops.append(("release_session", (self.keys.session(session_id), worker_id), {}))

    def acknowledge(self, stream: str, entry_id: str, job_id: str | None = None) -> None:
        """The job's final event is queued before this: expire its output, XACK and XDEL the
        entry (deleting acknowledged entries keeps the job streams as long as their backlog)."""
        if job_id is not None:
            self._ops.append(("expire", (self.keys.out(job_id), self.out_ttl_s), {}))
        self._ops.append(("xack", (stream, GROUP, entry_id), {}))
        self._ops.append(("xdel", (stream, entry_id), {}))

    def dead_letter(self, stream: str, entry_id: str, payload: str, reason: str,
                    job_id: str | None) -> None:
        fields = {"stream": stream, "entry_id": entry_id, "reason": reason,
                  "job_id": job_id or "", "payload": payload}
        self._ops.append(("xadd", (self.keys.dead, fields), {"maxlen": DEAD_MAXLEN,
                                                            "approximate": True}))

    def narration(self, fields: dict[str, str]) -> None:
        with self._lock:
            if self._narration_queued >= NARRATION_BUFFER:
                self.narration_dropped += 1
                return
            self._narration_queued += 1
        self._ops.append(("xadd", (self.keys.narration, fields),
                          {"maxlen": NARRATION_MAXLEN, "approximate": True}))

    # ----- sending ----------------------------------------------------------------------------

    def flush(self, reads: Callable[[redis.client.Pipeline], int] | None = None) -> bool:
        """Send what is queued; False (and everything kept) when Redis is away. `reads`
        queues read commands (returning how many) after the last writes, in the same round
        trip; their replies are kept for `pop_reads` (none when nothing was written). With the
        writer thread this only wakes it and says whether Redis was last seen up; `reads` then
        run on the writer thread with its next send (alone if nothing is queued), and
        `pop_reads` gives their replies once they are back (`READS_LOST`: not sent, Redis was
        away). One flush's reads at a time."""
        if self._writer is not None:
            if reads is not None:
                with self._lock:
                    if self._next_reads is not None:
                        raise RuntimeError("the last flush's reads are not sent yet")
                    self._reads_ready.clear()
                    self._next_reads = reads
            self._wake.set()
            return self.link.up
        sent, self._reads = self._send_queued(reads)
        return sent

    def _send_queued(self, reads: Callable[[redis.client.Pipeline], int] | None = None,
                     alone: bool = False) -> tuple[bool, list | None]:
        """Send the queue on the calling thread, `reads` after its last writes (`alone`: in a
        round trip of their own when nothing was written); whether all went, and the reads'
        replies (None when they were not sent)."""
        replies = None
        while self._ops:
            if not self.link.ready():
                return False, None
            ops = [self._ops[i] for i in range(min(len(self._ops), MAX_OPS_PER_FLUSH))]
            last = reads if len(ops) == len(self._ops) else None
            try:
                results = self.link.call(self._send, ops, last)
            except RedisDown:
                return False, None
            if last is not None:
                replies = results[len(ops):]
                results = results[:len(ops)]
                reads = None  # sent: not again with script calls sent again below
            for _ in ops:
                self._ops.popleft()
            # Script calls Redis refused with NOSCRIPT did nothing: sent again, first, with
            # the scripts loaded (a job's final stays after its tokens, written just before).
            again = {i for i, result in enumerate(results) if self.scripts.refused(result)}
            if again:
                self._ops.extendleft(ops[i] for i in sorted(again, reverse=True))
                ops = [op for i, op in enumerate(ops) if i not in again]
                results = [r for i, r in enumerate(results) if i not in again]
            narration = sum(1 for _, args, _ in ops if args[0] == self.keys.narration)
            with self._lock:
                self._narration_queued -= narration
            self.events_published += sum(1 for op in ops if op[0] in ("event", "xadd", "final"))
            self.events_published -= narration
            self._report_errors(ops, results)
        if reads is not None and alone:
            if not self.link.ready():
                return False, None
            try:
                replies = self.link.call(self._send, [], reads)
            except RedisDown:
                return False, None
        return True, replies

    def pop_reads(self, timeout_s: float = 0.0) -> list | object | None:
        """Replies of the reads sent with the last flush (None if they were not sent). With
        the writer thread: None while they are not back, waiting up to `timeout_s` for them;
        `READS_LOST` when the writer could not send them."""
        if self._writer is None:
            reads, self._reads = self._reads, None
            return reads
        if not self._reads_ready.wait(timeout_s):
            return None
        self._reads_ready.clear()
        reads, self._thread_reads = self._thread_reads, None
        return reads

    def pop_refused_finals(self) -> list[str]:
        """Jobs whose final event was refused since the last call: another worker owns them."""
        with self._lock:
            refused, self.refused_finals = self.refused_finals, []
        return refused

    def _send(self, ops: list[tuple[str, tuple, dict]], reads=None) -> list:
        """One MULTI/EXEC of `ops` (then `reads`); one result per op, then the reads'."""
        pipe = self.link.redis.pipeline(transaction=True)
        commands = _commands(ops)
        for first, count in commands:
            method, args, kwargs = ops[first]
            if method == "event":
                run = ops[first:first + count]
                blob = "".join(f"{args[1]}\n{_to_json(args[2])}\n" for _, args, _ in run)
                self._events_script.queue(pipe, [args[0] for _, args, _ in run],
                                          [EVENT_FIELD, DATA_FIELD, blob])
            elif method == "final":
                final = list(kwargs["args"])
                final[5] = _to_json(final[5])
                self._final_script.queue(pipe, list(args[:2]), final)
            elif method == "release_session":
                self._release_script.queue(pipe, [args[0]], [args[1]])
            else:
                getattr(pipe, method)(*args, **kwargs)
        if reads is not None:
            reads(pipe)
        # raise_on_error=False: a command refused by Redis (say WRONGTYPE on a key someone
        # else wrote) comes back as an exception object instead of failing the whole flush,
        # which would otherwise be retried forever.
        replies = pipe.execute(raise_on_error=False)
        results: list = []
        for (first, count), reply in zip(commands, replies, strict=False):
            if ops[first][0] == "event":
                results.extend(_event_results(count, reply))
            else:
                results.append(reply)
        return results + replies[len(commands):]

    def pop_unwritable(self) -> dict[str, Unwritable]:
        """Jobs whose output stream Redis refused a write to since the last call (say
        WRONGTYPE: someone wrote another type under the key); the caller ends them."""
        with self._lock:
            failed, self.unwritable = self.unwritable, {}
        return failed

    def _report_errors(self, ops: list, results: list) -> None:
        out_prefix = self.keys.out("")
        for (method, args, kwargs), result in zip(ops, results, strict=False):
            if method == "final" and result == 0:
                with self._lock:
                    self.refused_finals.append(args[2])
            elif isinstance(result, redis.ResponseError) and method == "final":
                with self._lock:
                    self.unwritable[args[2]] = Unwritable(str(result), args[0],
                                                          kwargs["args"][2])
            elif isinstance(result, redis.ResponseError) and method == "event":
                job_id = str(args[0])[len(out_prefix):]
                with self._lock:
                    self.unwritable.setdefault(job_id, Unwritable(str(result)))
            elif isinstance(result, redis.ResponseError):
                self._log.error(
                    "redis.write_refused",
                    narration=f"Redis refused {method.upper()} {args[0]}: {result}",
                    command=method, key=str(args[0]), error=str(result),
                )


def _commands(ops: list[tuple[str, tuple, dict]]) -> list[tuple[int, int]]:
    """(first op, op count) of each command a flush sends: a run of events is one command."""
    commands: list[tuple[int, int]] = []
    for i, (method, _, _) in enumerate(ops):
        if method == "event" and commands and ops[commands[-1][0]][0] == "event":
            commands[-1] = (commands[-1][0], commands[-1][1] + 1)
        else:
            commands.append((i, 1))
    return commands


def _event_results(count: int, reply) -> list:
    """Per-event results of one `_XADD_EACH` call: True, or the error Redis gave that XADD
    (the call's own error, a NOSCRIPT say, stands for every event of the run)."""
    if isinstance(reply, Exception):
        return [reply] * count
    results: list = [True] * count
    for i in range(0, len(reply), 2):
        message = reply[i + 1]
        results[reply[i] - 1] = redis.ResponseError(
            message.decode() if isinstance(message, bytes) else str(message))
    return results


# One encoder for every event: json.dumps with an option builds a new one per call.
_to_json = json.JSONEncoder(ensure_ascii=False).encode
