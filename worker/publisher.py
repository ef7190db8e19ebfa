"""Everything the worker writes to Redis, sent in one MULTI/EXEC per loop iteration.

Writes are queued in order (a job's events before its XACK) and flushed together, so the
events of one engine step cost one round trip. Narration lines are queued in the same order,
so a reader of both streams sees "Started job" before the job's first token. While Redis is
away the queue keeps growing and no event is lost; narration is the exception: past
`NARRATION_BUFFER` queued lines, new ones are dropped (and counted). MULTI/EXEC makes a flush
all-or-nothing, so a retried flush never leaves half of a step behind; if EXEC ran but its
reply was lost, the retry writes the step twice,
and readers drop repeated tokens by their `index` (`jobs.protocol.EventFollower`).
"""

from __future__ import annotations

import json
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

    def __len__(self) -> int:
        return len(self._ops)

    # ----- queueing ---------------------------------------------------------------------------

    def write(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queue any redis-py pipeline call, e.g. write("set", key, value, ex=60)."""
        self._ops.append((method, args, kwargs))

    def event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Queue one event for `orcd:out:{job_id}`."""
        self._ops.append(("event", (self.keys.out(job_id), kind, _to_json(data)), {}))

    def opened(self, job_id: str) -> None:
        """A job's first event was queued: give its stream a long safety TTL. Queue it after
        that event: an EXPIRE on a stream that does not exist yet does nothing (it did, and
        the output of a job whose worker died mid-run never expired)."""
        self._ops.append(("expire", (self.keys.out(job_id), OUT_TTL_RUNNING_S), {}))

    def final(self, job_id: str, kind: str, data: dict[str, Any], *, stream: str, entry_id: str,
              consumer: str, attempt: int) -> None:
        """Queue a job's `done` or `error` with its acknowledgement, written only if this
        consumer still owns the delivery (`_FINAL_IF_OWNER`): at most one final per job."""
        args = (GROUP, consumer, entry_id, attempt, kind, _to_json(data), self.out_ttl_s)
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
        trip; their replies are kept for `pop_reads` (none when nothing was written)."""
        self._reads = None
        while self._ops:
            if not self.link.ready():
                return False
            ops = [self._ops[i] for i in range(min(len(self._ops), MAX_OPS_PER_FLUSH))]
            last = reads if len(ops) == len(self._ops) else None
            try:
                results = self.link.call(self._send, ops, last)
            except RedisDown:
                return False
            if last is not None:
                self._reads = results[len(ops):]
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
            self._narration_queued -= narration
            self.events_published += sum(1 for op in ops if op[0] in ("event", "xadd", "final"))
            self.events_published -= narration
            self._report_errors(ops, results)
        return True

    def pop_reads(self) -> list | None:
        """Replies of the reads sent with the last flush (None if they were not sent)."""
        reads, self._reads = self._reads, None
        return reads

    def pop_refused_finals(self) -> list[str]:
        """Jobs whose final event was refused since the last call: another worker owns them."""
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
                blob = "".join(f"{args[1]}\n{args[2]}\n" for _, args, _ in run)
                self._events_script.queue(pipe, [args[0] for _, args, _ in run],
                                          [EVENT_FIELD, DATA_FIELD, blob])
            elif method == "final":
                self._final_script.queue(pipe, list(args[:2]), list(kwargs["args"]))
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
        failed, self.unwritable = self.unwritable, {}
        return failed

    def _report_errors(self, ops: list, results: list) -> None:
        out_prefix = self.keys.out("")
        for (method, args, kwargs), result in zip(ops, results, strict=False):
            if method == "final" and result == 0:
                self.refused_finals.append(args[2])
            elif isinstance(result, redis.ResponseError) and method == "final":
                self.unwritable[args[2]] = Unwritable(str(result), args[0], kwargs["args"][2])
            elif isinstance(result, redis.ResponseError) and method == "event":
                job_id = str(args[0])[len(out_prefix):]
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
