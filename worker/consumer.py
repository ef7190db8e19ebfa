"""Reading jobs: consumer groups, XREADGROUP on the shared and routed streams, reclaiming a
dead worker's jobs, and validating entries into deliveries, control messages or rejections.

Reclaim is by dead *consumer*, not by idle time alone: XAUTOCLAIM cannot filter by consumer
and an entry's idle time only resets on (re)delivery, so it would steal a live worker's long
answer. A consumer is dead when its heartbeat key (`orcd:worker:{id}`) is gone; its pending
entries idle past `reclaim_idle_ms` are XCLAIMed (which counts a delivery), and the unread
jobs of its routed stream are read as ours. `times_delivered` from XPENDING gives `attempt`.
The claim itself is one script (`_CLAIM_IF_DEAD`) that checks, at the moment of the XCLAIM,
that the owner's heartbeat is still absent and each entry still pending with it: a worker
whose heartbeat came back (or that another worker reclaimed from first) keeps its jobs.

A worker that stops with jobs unfinished `release`s them: their idle time is set past the
reclaim threshold (XCLAIM to itself with IDLE and JUSTID, which leaves the delivery count
alone), so once its heartbeat is gone the next reclaim pass elsewhere takes them at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from jobs.events import INVALID_JOB, INVALID_JSON, PAYLOAD_TOO_LARGE
from jobs.keys import CONTROL_FIELD, GROUP, JOB_FIELD, Keys
from jobs.keys import QUEUE_CONSUMER as QUEUE
from jobs.schema import ID_PATTERN, MAX_JOB_BYTES, EndSession, GenerationJob, validation_error_code
from jobs.schema import describe_validation_error as describe
from worker.job_runner import Delivery

DEAD_PAYLOAD_CHARS = 64 * 1024  # a dead letter keeps the head of a huge payload, and its size
# KEYS: the stream, the old owner's heartbeat key. ARGV: group, new consumer, min idle (ms),
# old consumer, entry ids. Nothing is claimed while the old owner's heartbeat exists.
_CLAIM_IF_DEAD = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {}
end
local ids = {}
for i = 5, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[4] then
    ids[#ids + 1] = ARGV[i]
  end
end
if #ids == 0 then
  return {}
end
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
"""
_JOB_ID_RE = re.compile(ID_PATTERN)


@dataclass(slots=True)
class Entry:
    """A raw stream entry handed to this worker, with its delivery count."""

    stream: str
    entry_id: str
    fields: dict[str, bytes]
    attempt: int = 1
    reclaimed_from: str | None = None  # the dead worker this entry was reclaimed from


@dataclass(slots=True)
class Rejection:
    """An entry that is not a valid job: dead-lettered, with an `error` event when possible."""

    entry: Entry
    code: str
    message: str
    job_id: str | None
    payload: str


@dataclass(slots=True)
class Control:
    entry: Entry
    message: EndSession


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse_entry(entry: Entry) -> Delivery | Control | Rejection:
    """Validate one entry against the wire contract."""
    raw = entry.fields.get(JOB_FIELD)
    if raw is None and CONTROL_FIELD in entry.fields:
        raw_control = entry.fields[CONTROL_FIELD]
        try:
            return Control(entry, EndSession.model_validate_json(raw_control))
        except ValidationError as exc:
            return Rejection(entry, INVALID_JOB, f"bad control message: {describe(exc)}", None,
                             _text(raw_control)[:DEAD_PAYLOAD_CHARS])
    if raw is None:
        names = ", ".join(sorted(entry.fields)) or "none"
        return Rejection(entry, INVALID_JOB, f"entry has no 'job' field (fields: {names})",
                         None, json.dumps(entry.fields, default=_text)[:DEAD_PAYLOAD_CHARS])
    payload = _text(raw)
    if len(raw) > MAX_JOB_BYTES:
        return Rejection(entry, PAYLOAD_TOO_LARGE,
                         f"job is {len(raw)} bytes; the limit is {MAX_JOB_BYTES}",
                         _sniff_job_id(payload), payload[:DEAD_PAYLOAD_CHARS])
    try:
        document = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return Rejection(entry, INVALID_JSON, f"job is not JSON: {exc}", _sniff_job_id(payload),
                         payload)
    job_id = document.get("job_id") if isinstance(document, dict) else None
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        job_id = None
    try:
        job = GenerationJob.model_validate_json(raw)
    except ValidationError as exc:
        return Rejection(entry, validation_error_code(exc), describe(exc), job_id, payload)
    return Delivery(entry.stream, entry.entry_id, job, entry.attempt)


def _sniff_job_id(payload: str) -> str | None:
    """The job id of a payload that is too big or not JSON, if a plain one can be seen."""
    match = re.search(r'"job_id"\s*:\s*"([A-Za-z0-9._:-]{1,128})"', payload[:4096])
    return match.group(1) if match else None


class Consumer:
    """This worker's reads from the model's streams (calls raise redis errors to the caller)."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str, worker_id: str, *,
                 reclaim_idle_ms: int = 30_000) -> None:
        self.redis = client
        self.keys = keys
        self.model = model
        self.worker_id = worker_id
        self.reclaim_idle_ms = reclaim_idle_ms
        self.shared = keys.jobs(model)
        self.routed = keys.routed(model, worker_id)
        self._claim_if_dead = client.register_script(_CLAIM_IF_DEAD)

    def ensure_groups(self) -> None:
        for stream in (self.shared, self.routed):
            create_group(self.redis, stream)

    def read_pipeline(self, pipe: redis.client.Pipeline, count: int, block_ms: int | None) -> None:
        """Queue the XREADGROUP of new entries on both streams (block_ms None: don't block)."""
        # redis-py: block=0 means BLOCK 0, wait forever; None leaves BLOCK out (return at once).
        pipe.xreadgroup(GROUP, self.worker_id, {self.shared: ">", self.routed: ">"},
                        count=count, block=block_ms)

    @staticmethod
    def entries_of(reply, attempt: int = 1) -> list[Entry]:
        """Entries of an XREADGROUP/XREAD reply (RESP2: [[stream, [(id, fields)...]]...])."""
        out = []
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                if fields is None:  # an entry deleted while pending
                    continue
                out.append(Entry(_text(stream), _text(entry_id),
                                 {_text(k): v for k, v in fields.items()}, attempt))
        return out

    # ----- reclaiming a dead worker's jobs -----------------------------------------------------

    def reclaim(self, capacity: int) -> list[Entry]:
        """Pending jobs of dead consumers and unread jobs routed to dead workers, at most
        `capacity`; forgets dead workers whose streams are empty."""
        claimed: list[Entry] = []
        for stream, consumer in self._dead_consumers(self.shared):
            if len(claimed) >= capacity:
                return claimed
            claimed += self._claim(stream, consumer, capacity - len(claimed))
        for worker_id in self._dead_workers():
            if len(claimed) >= capacity:
                break
            routed = self.keys.routed(self.model, worker_id)
            create_group(self.redis, routed)
            found = self._claim(routed, worker_id, capacity - len(claimed))
            if len(claimed) + len(found) < capacity:  # queued there, not started by it
                found += self._claim(routed, QUEUE, capacity - len(claimed) - len(found),
                                     idle_ms=0, owner=worker_id)
            if len(claimed) + len(found) < capacity:
                reply = self.redis.xreadgroup(GROUP, self.worker_id, {routed: ">"},
                                              count=capacity - len(claimed) - len(found))
                for entry in self.entries_of(reply):
                    entry.reclaimed_from = worker_id
                    found.append(entry)
            claimed += found
            if not found and self.redis.xlen(routed) == 0:
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(routed)
                pipe.hdel(self.keys.workers, worker_id)
                pipe.execute()
        return claimed

    def _dead_consumers(self, stream: str) -> list[tuple[str, str]]:
        try:
            consumers = self.redis.xinfo_consumers(stream, GROUP)
        except redis.ResponseError:  # no stream or no group yet
            return []
        # The admission queue's consumer (worker/admission.py) holds queued jobs, not a dead
        # worker's: it has no heartbeat.
        consumers = [c for c in consumers if _text(c["name"]) not in (self.worker_id, QUEUE)]
        names = [_text(c["name"]) for c in consumers]
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.worker(name))
        alive = pipe.execute()
        dead = []
        for consumer, name, live in zip(consumers, names, alive, strict=False):
            if live:
                continue
            if consumer["pending"]:
                dead.append((stream, name))
            elif consumer["idle"] > self.reclaim_idle_ms:
                # A dead consumer with nothing pending: drop it so `orcd status` stays clean.
                self.redis.xgroup_delconsumer(stream, GROUP, name)
        return dead

    def _dead_workers(self) -> list[str]:
        workers = self.redis.hgetall(self.keys.workers)
        candidates = []
        for raw_id, raw_info in workers.items():
            worker_id = _text(raw_id)
            if worker_id == self.worker_id:
                continue
            try:
                model = json.loads(raw_info).get("model")
            except ValueError:
                continue
            if model == self.model:
                candidates.append(worker_id)
        if not candidates:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in candidates:
            pipe.exists(self.keys.worker(worker_id))
        return [w for w, live in zip(candidates, pipe.execute(), strict=True) if not live]

    def _claim(self, stream: str, consumer: str, count: int, *, idle_ms: int | None = None,
               owner: str | None = None) -> list[Entry]:
        """Claim `consumer`'s entries idle `idle_ms` (default: the reclaim threshold) while
        `owner`'s heartbeat (default: the consumer's) is absent."""
        idle = self.reclaim_idle_ms if idle_ms is None else idle_ms
        rows = self.redis.xpending_range(stream, GROUP, min="-", max="+", count=count,
                                         consumername=consumer, idle=idle or None)
        if not rows:
            return []
        deliveries = {_text(row["message_id"]): row["times_delivered"] for row in rows}
        # XCLAIM with the same min-idle: if another worker claimed an entry meanwhile, its idle
        # time was reset and this claim skips it (no double reclaim). XCLAIM counts a delivery.
        # Entries deleted while pending are dropped from the PEL and not returned (Redis 7).
        claimed = self._claim_if_dead(
            keys=[stream, self.keys.worker(owner or consumer)],
            args=[GROUP, self.worker_id, idle, consumer, *deliveries],
        )
        out = []
        for item in claimed or ():
            if not item or not item[1]:  # an entry deleted while pending (Redis 6)
                continue
            entry_id, flat = _text(item[0]), item[1]
            fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
            # XCLAIM counted a delivery (of a queued entry too): the attempt is Redis's count.
            out.append(Entry(stream, entry_id, fields, deliveries[entry_id] + 1,
                             owner or consumer))
        return out

    def release(self, entries: list[tuple[str, str]]) -> None:
        """Make this worker's pending (stream, entry id)s claimable at once by the others (see
        the module docstring); they take them when this worker's heartbeat is gone."""
        idle = self.reclaim_idle_ms + 1000
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in entries:
            pipe.xclaim(stream, GROUP, self.worker_id, 0, [entry_id], idle=idle, justid=True)
        pipe.execute()


def create_group(client: redis.Redis, stream: str) -> None:
    """XGROUP CREATE stream workers 0 MKSTREAM, tolerating an existing group. Id 0, not $:
    jobs added before the first worker started are served too."""
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
