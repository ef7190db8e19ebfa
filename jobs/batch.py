"""Batch jobs through RQ: many prompts in, one ordered result per prompt out.

    batch_id = enqueue_batch([{"prompt": "Hi"}, {"messages": [...]}], "smollm2-135m",
                             {"max_tokens": 64}, redis_url="redis://localhost:6379/0")

`enqueue_batch` puts ONE RQ job on queue `orcd-batch`. An RQ worker runs `run_batch`: it
validates every item into a `GenerationJob`, fans them out to the model's stream in pipelined
XADDs, then follows their output streams with one blocking XREAD over many streams at a time
(`FollowWindow`: the oldest unfinished items, at most `WINDOW` streams) on one connection, so
a batch of thousands holds one connection and no thread per item. Items whose job failed for
a reason worth retrying are resubmitted under a new job id (the old id's output stream
already ends in `error`), up to `max_attempts`. An item that fails for good, or whose payload
is invalid, is reported as failed; the batch still succeeds. Progress is in the RQ job's
`meta` (`total`, `done`, `failed`, `completed`, `retries`, `progress`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue, get_current_job
from rq.job import Job

from jobs.client import CANCEL_TTL_S, OrcdClient
from jobs.events import INVALID_JOB, INVALID_JSON, INVALID_REQUEST, PAYLOAD_TOO_LARGE, UNKNOWN_MODEL
from jobs.keys import JOB_FIELD
from jobs.limits import DEFAULT_MODEL
from jobs.protocol import JobEvent, as_text, build_job, encode_job
from jobs.redis_url import connect
from jobs.schema import GenerationJob, describe_validation_error, validation_error_code

QUEUE = "orcd-batch"
WINDOW = 512  # output streams per XREAD; Redis takes thousands, but replies stay small
XADD_CHUNK = 500  # XADDs per pipeline round trip
READ_BLOCK_MS = 1000
META_EVERY_S = 0.5  # at most this often a save_meta while following
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 6 * 3600  # the whole batch; unfinished items then fail with `timeout`
DEFAULT_RESULT_TTL_S = 7 * 24 * 3600  # RQ's own default (500 s) is too short to fetch results
TIMEOUT = "timeout"
# Errors that the same job would hit again: no retry.
PERMANENT_CODES = frozenset({INVALID_JOB, INVALID_JSON, PAYLOAD_TOO_LARGE, UNKNOWN_MODEL,
                             INVALID_REQUEST})
# Keys of an item handled here rather than passed to `build_job`.
RESERVED_ITEM_KEYS = frozenset({"model", "job_id", "stream"})


def enqueue_batch(
    items: Iterable[dict],
    model: str = DEFAULT_MODEL,
    sampling: dict | None = None,
    *,
    redis_url: str = "redis://localhost:6379/0",
    prefix: str = "orcd",
    out_path: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    result_ttl_s: int = DEFAULT_RESULT_TTL_S,
    batch_id: str | None = None,
    connection: redis.Redis | None = None,
) -> str:
    """Put one batch on the `orcd-batch` RQ queue; returns the batch id (the RQ job id).

    Each item is a job without `model`: `prompt` or `messages`, optionally `sampling` (merged
    over the batch's `sampling`), sampling fields (`max_tokens`...), `session_id`,
    `metadata`. `out_path` is written as JSONL by the RQ worker, on its filesystem."""
    items = list(items)
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    rq_connection = connection if connection is not None else connect(redis_url)
    queue = Queue(QUEUE, connection=rq_connection)
    job = queue.enqueue(
        run_batch,
        kwargs={"items": items, "model": model, "sampling": dict(sampling or {}),
                "redis_url": redis_url, "prefix": prefix, "out_path": out_path,
                "max_attempts": max_attempts, "timeout_s": timeout_s},
        job_id=batch_id,
        job_timeout=int(timeout_s) + 300,  # the batch ends itself first, with its results
        result_ttl=result_ttl_s,
        failure_ttl=result_ttl_s,
        description=f"orcd batch: {len(items)} items on {model}",
        meta={**Progress(total=len(items)).as_meta(), "model": model},
    )
    return job.id


def run_batch(
    items: list[dict],
    model: str,
    sampling: dict,
    redis_url: str,
    prefix: str = "orcd",
    out_path: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict]:
    """The RQ job: run every item, record progress in `job.meta`, return the ordered results."""
    rq_job = get_current_job()
    batch_id = rq_job.id if rq_job is not None else f"batch-{os.getpid()}-{time.time_ns()}"
    last_saved = 0.0

    def report(progress: Progress, final: bool) -> None:
        nonlocal last_saved
        now = time.monotonic()
        if rq_job is None or (not final and now - last_saved < META_EVERY_S):
            return
        rq_job.meta.update(progress.as_meta())
        rq_job.save_meta()
        last_saved = now

    with OrcdClient(redis_url, prefix=prefix) as client:
        runner = BatchRunner(client, batch_id, model, sampling, max_attempts=max_attempts,
                             timeout_s=timeout_s, on_progress=report)
        results = runner.run(items)
    if out_path:
        write_jsonl(out_path, results)
    return results


@dataclass(slots=True)
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    retries: int = 0

    @property
    def completed(self) -> int:
        return self.done + self.failed

    def as_meta(self) -> dict[str, Any]:
        fraction = self.completed / self.total if self.total else 1.0
        return {"total": self.total, "done": self.done, "failed": self.failed,
                "completed": self.completed, "retries": self.retries,
                "progress": round(fraction, 4)}


@dataclass(slots=True)
class Item:
    """One batch item: its job (None when invalid), attempt, and where its events are read."""

    index: int
    job: GenerationJob | None
    attempt: int = 1
    last_id: str = "0"
    result: dict | None = None

    @property
    def job_id(self) -> str:
        return self.job.job_id if self.job is not None else ""


@dataclass
class BatchRunner:
    """Fan out, follow, retry; see the module docstring. Works on any `OrcdClient`."""

    client: OrcdClient
    batch_id: str
    model: str
    sampling: dict
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_s: float = DEFAULT_TIMEOUT_S
    on_progress: Callable[[Progress, bool], None] = lambda progress, final: None
    block_ms: int = READ_BLOCK_MS
    progress: Progress = field(init=False)

    def run(self, raw_items: list[Any]) -> list[dict]:
        deadline = time.monotonic() + self.timeout_s
        self.progress = Progress(total=len(raw_items))
        items = [self._validate(index, raw) for index, raw in enumerate(raw_items)]
        self._submit([item for item in items if item.result is None])
        self.on_progress(self.progress, False)
        unfinished = [item for item in items if item.result is None]
        while unfinished:
            if time.monotonic() >= deadline:
                self._time_out(unfinished)
                break
            window = unfinished[:WINDOW]
            if self._read(window, deadline):
                self.on_progress(self.progress, False)
            unfinished = [item for item in unfinished if item.result is None]
        self.on_progress(self.progress, True)
        return [item.result for item in items]

    # ----- fan out ----------------------------------------------------------------------------

    def _job_id(self, index: int, attempt: int) -> str:
        suffix = "" if attempt == 1 else f".r{attempt}"
        return f"{self.batch_id}.{index}{suffix}"

    def _validate(self, index: int, raw: Any) -> Item:
        """The item as a job, or an item already failed with the reason."""
        item = Item(index, None)
        if not isinstance(raw, dict):
            self._fail(item, INVALID_JOB, f"an item is a JSON object, not {type(raw).__name__}")
            return item
        reserved = sorted(RESERVED_ITEM_KEYS & raw.keys())
        if reserved:
            self._fail(item, INVALID_JOB, f"an item may not set {', '.join(reserved)}")
            return item
        fields = dict(raw)
        try:
            sampling = {**self.sampling, **(fields.pop("sampling", None) or {})}
            item.job = build_job(model=self.model, job_id=self._job_id(index, 1),
                                 sampling=sampling, stream=False, **fields)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            self._fail(item, validation_error_code(exc), describe_validation_error(exc))
        return item

    def _submit(self, items: list[Item]) -> None:
        """XADD the items' jobs, `XADD_CHUNK` per round trip."""
        for start in range(0, len(items), XADD_CHUNK):
            pipe = self.client.redis.pipeline(transaction=False)
            for item in items[start:start + XADD_CHUNK]:
                stream = self.client.stream_for(self.model, item.job.session_id)
                pipe.xadd(stream, {JOB_FIELD: encode_job(item.job)})
            pipe.execute()

    # ----- follow -----------------------------------------------------------------------------

    def _read(self, window: list[Item], deadline: float) -> bool:
        """One blocking XREAD over the window's output streams; True if an item ended."""
        by_stream = {self.client.keys.out(item.job_id): item for item in window}
        block = max(1, min(self.block_ms, int((deadline - time.monotonic()) * 1000)))
        reply = self.client.redis.xread({key: item.last_id for key, item in by_stream.items()},
                                        block=block, count=16)
        ended, retry = False, []
        for raw_key, entries in reply or ():
            item = by_stream[as_text(raw_key)]
            for entry_id, fields in entries:
                event = JobEvent.from_entry(entry_id, fields)
                item.last_id = event.id
                if event.kind == "done":
                    self._succeed(item, event.data)
                elif event.kind == "error":
                    code, message = event.data.get("code", "?"), event.data.get("message", "")
                    if code in PERMANENT_CODES or item.attempt >= self.max_attempts:
                        self._fail(item, code, message)
                    else:
                        retry.append(item)
                if event.final:
                    ended = True
                    break
        for item in retry:
            item.attempt += 1
            item.last_id = "0"
            item.job = item.job.model_copy(update={"job_id": self._job_id(item.index,
                                                                          item.attempt)})
            self.progress.retries += 1
        if retry:
            self._submit(retry)
        return ended

    def _time_out(self, items: list[Item]) -> None:
        pipe = self.client.redis.pipeline(transaction=False)
        for item in items:
            pipe.set(self.client.keys.cancel(item.job_id), 1, ex=CANCEL_TTL_S)
            self._fail(item, TIMEOUT, f"no answer within the batch's {self.timeout_s:.0f} s")
        pipe.execute()

    # ----- results ----------------------------------------------------------------------------

    def _succeed(self, item: Item, done: dict) -> None:
        item.result = {"index": item.index, "status": "done", "text": done["text"],
                       "finish_reason": done["finish_reason"], "usage": done["usage"],
                       "error": None, "attempts": item.attempt, "job_id": item.job_id,
                       "metadata": done.get("metadata", {})}
        self.progress.done += 1

    def _fail(self, item: Item, code: str, message: str) -> None:
        item.result = {"index": item.index, "status": "failed", "text": None,
                       "finish_reason": None, "usage": None,
                       "error": {"code": code, "message": message},
                       "attempts": item.attempt if item.job is not None else 0,
                       "job_id": item.job_id or None,
                       "metadata": item.job.metadata if item.job is not None else {}}
        self.progress.failed += 1


# ----- reading a batch back (CLI, backends) ---------------------------------------------------


def fetch_batch(batch_id: str, connection: redis.Redis) -> Job:
    """The batch's RQ job; `rq.exceptions.NoSuchJobError` once it has expired."""
    return Job.fetch(batch_id, connection=connection)


def batch_status(job: Job) -> dict[str, Any]:
    """RQ status plus the progress counters from `meta`."""
    meta = job.get_meta(refresh=True)
    return {"id": job.id, "status": job.get_status(refresh=True).value,
            **{key: meta.get(key) for key in ("model", "total", "done", "failed", "completed",
                                              "retries", "progress")}}


def batch_results(job: Job) -> list[dict] | None:
    """The ordered results once the batch finished, else None."""
    return job.return_value(refresh=True)


def write_jsonl(path: str, results: list[dict]) -> None:
    """One result per line, written to a temporary file and renamed: never half a file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        for result in results:
            file.write(json.dumps(result, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
