"""Where a queued job stands: its position among the jobs no worker has started, and an ETA.

Computed by the client from one read of the job stream (no worker writes it): the stream
holds the entries not yet acknowledged; those pending with the `queued` consumer or not yet
delivered to the group are waiting, the others run. Waiting jobs are ordered as the workers'
admission orders them: `priority` plus one level per `priority_aging_s` seconds waited (the
workers' heartbeats carry the setting), the oldest first among equals. The ETA is the number
of jobs to start before this one, plus one, over the jobs the model's live workers ended per
second lately (their heartbeats' `jobs_per_s`); None while they have ended none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jobs.keys import GROUP, JOB_FIELD, QUEUE_CONSUMER

SCAN_LIMIT = 10_000  # waiting entries read per stream
DEFAULT_AGING_S = 1.0


@dataclass(slots=True, frozen=True)
class QueuePosition:
    """`position` 0: the next job of its stream to start; `waiting`: jobs waiting in all."""

    job_id: str
    stream: str
    position: int
    waiting: int
    eta_s: float | None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def read_pipeline(pipe, stream: str) -> None:
    """Queue the reads `position_in` needs on a redis-py pipeline (sync or asyncio)."""
    pipe.xinfo_groups(stream)
    pipe.xpending_range(stream, GROUP, min="-", max="+", count=SCAN_LIMIT,
                        consumername=QUEUE_CONSUMER)
    pipe.xrange(stream, min="-", max="+", count=SCAN_LIMIT)


def position_in(job_id: str, stream: str, replies: list, now_ms: int, aging_s: float,
                jobs_per_s: float) -> QueuePosition | None:
    """The job's place among the stream's waiting jobs (replies of `read_pipeline`); None if
    the stream holds it but not as waiting (a worker runs it), or does not hold it."""
    groups, queued_rows, entries = replies
    if isinstance(groups, Exception):  # no stream (or no group) yet
        return None
    last = next((_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == GROUP),
                "0-0")
    queued = {_text(row["message_id"]) for row in queued_rows or ()} \
        if not isinstance(queued_rows, Exception) else set()
    waiting: list[tuple[float, tuple[int, int], str]] = []
    for raw_id, fields in entries or ():
        entry_id = _text(raw_id)
        if entry_id not in queued and _id_key(entry_id) <= _id_key(last):
            continue  # delivered to a worker: running
        raw = (fields or {}).get(JOB_FIELD.encode(), (fields or {}).get(JOB_FIELD))
        if raw is None:
            continue  # a control message
        try:
            job = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(job, dict):
            continue
        priority = job.get("priority", 0)
        priority = priority if isinstance(priority, int) else 0
        enqueued = _id_key(entry_id)
        score = priority + (now_ms - enqueued[0]) / (aging_s * 1000)
        waiting.append((score, enqueued, str(job.get("job_id"))))
    ours = next((item for item in waiting if item[2] == job_id), None)
    if ours is None:
        return None
    ahead = sum(1 for score, enqueued, _ in waiting
                if score > ours[0] or (score == ours[0] and enqueued < ours[1]))
    eta = (ahead + 1) / jobs_per_s if jobs_per_s > 0 else None
    return QueuePosition(job_id, stream, ahead, len(waiting), eta)


def serving_rate(model: str, workers: dict[str, dict]) -> tuple[float, float]:
    """Jobs per second ended lately by the live workers of `model`, and their aging setting."""
    serving = [info for info in workers.values() if info.get("model") == model]
    rate = sum(float(info.get("jobs_per_s") or 0) for info in serving)
    aging = next((float(info["priority_aging_s"]) for info in serving
                  if info.get("priority_aging_s")), DEFAULT_AGING_S)
    return rate, aging
