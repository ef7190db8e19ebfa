"""The Batch API: a JSONL file of requests becomes queued jobs, answered into output files.

All of a batch's state is in Redis (`orcd:gw:batch:{id}` and its `:results`), so a gateway can
die at any point and another (or the same, restarted) carries on:

- Each line's jobs have deterministic ids (`{batch_id}-{line}-{choice}`), and a line is put on
  the queue by one Lua script that also moves the batch's `submitted` counter, only if that
  counter still points at the line: a line is submitted exactly once.
- A result is written with HSETNX by line index, and the counters move in the same script:
  a line is answered exactly once, whichever gateway reads its jobs' output streams (they are
  read from their first event, so a driver that restarts misses nothing).
- One gateway drives a batch at a time, holding a lease key it renews; when the holder dies, the
  lease runs out and another gateway takes the batch over.
- The output and error files get ids derived from the batch id, so finishing twice writes the
  same files.

Lines run at a low priority (--batch-priority, default -100; a line's body may set its own)
and at most --batch-window lines of a batch are in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from pydantic import ValidationError

from gateway.auth import Caller, Limits
from gateway.completions import Call, ChoiceState, failure_status
from gateway.errors import APIError, bad_request, error_body
from gateway.files import FileStore
from gateway.follow import Failed, follow_jobs
from gateway.requests import BatchRequest, ChatCompletionRequest, CompletionRequest
from gateway.service import Gateway
from gateway.translate import chat_choices, completion_choices
from jobs.client import one_line
from jobs.protocol import encode_job
from jobs.schema import ID_PATTERN

COMPLETION_WINDOW_S = 24 * 3600
FINAL = ("completed", "failed", "cancelled", "expired")
BATCH_CALLER = Caller("batch", Limits())
_ID = re.compile(ID_PATTERN)

# Submit line ARGV[1] if the batch's `submitted` counter is still ARGV[1]: XADD each of its
# jobs (KEYS[2..]: their streams, ARGV[2..]: their JSON), then move the counter.
# KEYS[1]: the batch hash. Returns 1 if submitted now, 0 if it already was.
_SUBMIT = """
if tonumber(redis.call('HGET', KEYS[1], 'submitted') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'job', ARGV[i])
end
redis.call('HINCRBY', KEYS[1], 'submitted', 1)
return 1
"""
# Record line ARGV[1]'s result ARGV[2] once; count it as ARGV[3] ('completed' or 'failed').
# KEYS[1]: the batch hash, KEYS[2]: its results hash. Returns 1 if recorded now.
_RESULT = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return 1
"""
# Move the batch to status ARGV[1] (timestamp field ARGV[2] = ARGV[3]) if its status is one of
# ARGV[4..]. KEYS[1]: the batch hash. Returns 1 if it moved.
_STATUS = """
local status = redis.call('HGET', KEYS[1], 'status')
for i = 4, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3])
    return 1
  end
end
return 0
"""
TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def _missing(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", "batch_id", "batch_not_found")


class BatchStore:
    """Reading and moving a batch's state in Redis."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.redis, self.keys = gateway, gateway.redis, gateway.keys
        self._status = self.redis.register_script(_STATUS)
        self._result = self.redis.register_script(_RESULT)
        self._submit = self.redis.register_script(_SUBMIT)

    def key(self, batch_id: str) -> str:
        if not _ID.match(batch_id):
            raise _missing(batch_id)
        return self.keys.gateway_batch(batch_id)

    async def fields(self, batch_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.key(batch_id))
        if not raw:
            raise _missing(batch_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def get(self, batch_id: str) -> dict:
        """The batch as OpenAI's Batch object."""
        fields = await self.fields(batch_id)
        stamps = {name: int(fields[name]) if fields.get(name) else None for name in TIMESTAMPS}
        return {
            "id": batch_id, "object": "batch", "endpoint": fields["endpoint"],
            "errors": json.loads(fields["errors"]) if fields.get("errors") else None,
            "input_file_id": fields["input_file_id"],
            "completion_window": fields["completion_window"], "status": fields["status"],
            "output_file_id": fields.get("output_file_id") or None,
            "error_file_id": fields.get("error_file_id") or None, **stamps,
            "request_counts": {"total": int(fields.get("total", 0)),
                               "completed": int(fields.get("completed", 0)),
                               "failed": int(fields.get("failed", 0))},
            "metadata": json.loads(fields["metadata"]) if fields.get("metadata") else None,
        }

    async def move(self, batch_id: str, status: str, stamp: str, *allowed: str) -> bool:
        moved = await self._status(keys=[self.key(batch_id)],
                                   args=[status, stamp, int(time.time()), *allowed])
        return bool(moved)

    async def record(self, batch_id: str, line: int, result: dict, ok: bool) -> bool:
        recorded = await self._result(
            keys=[self.key(batch_id), self.keys.gateway_batch_results(batch_id)],
            args=[line, json.dumps(result, ensure_ascii=False), "completed" if ok else "failed"])
        return bool(recorded)

    async def submit_line(self, batch_id: str, line: int, streams: list[str],
                          jobs: list[str]) -> bool:
        done = await self._submit(keys=[self.key(batch_id), *streams], args=[line, *jobs])
        return bool(done)


# ----- the input file ----------------------------------------------------------------------


def parse_input(content: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """The input file's lines, and the errors that fail the whole batch (OpenAI's rule: a file
    that is not JSONL of {custom_id, method, url, body} is refused as a whole)."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:
            errors.append(_line_error("invalid_json_line", f"line {number} is not JSON: {exc}",
                                      number))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            errors.append(_line_error("missing_custom_id", "each line needs a string custom_id",
                                      number))
        elif item["custom_id"] in seen:
            errors.append(_line_error("duplicate_custom_id",
                                      f"custom_id {item['custom_id']!r} is used twice", number))
        elif item.get("method") != "POST" or item.get("url") != endpoint:
            errors.append(_line_error("invalid_url", f"the line must be a POST to {endpoint}, "
                                      "the batch's endpoint", number))
        elif not isinstance(item.get("body"), dict):
            errors.append(_line_error("invalid_body", "body must be a JSON object", number))
        else:
            seen.add(item["custom_id"])
            lines.append(item)
    if not lines and not errors:
        errors.append(_line_error("empty_file", "the input file holds no request", None))
    return lines, errors


def _line_error(code: str, message: str, line: int | None) -> dict:
    return {"code": code, "message": message, "param": None, "line": line}


async def line_call(gateway: Gateway, endpoint: str, batch_id: str, number: int, body: dict
                    ) -> Call:
    """A line's request as a Call holding its jobs; APIError(400) for a bad body."""
    chat = endpoint == "/v1/chat/completions"
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        request = model.model_validate({**body, "stream": False})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param or 'body'}: {first['msg']}", param) from None
    request_id = f"{batch_id}-{number}"
    priority = gateway.config.batch_priority
    choices = (chat_choices(request, request_id, default_priority=priority) if chat
               else completion_choices(request, request_id, default_priority=priority))
    logprobs = request.logprobs if chat else request.logprobs is not None
    pieces = await gateway.token_pieces(request.model) if logprobs else None
    return Call(gateway, BATCH_CALLER, request, chat, request_id, choices, pieces, 0.0)


# ----- the endpoints -----------------------------------------------------------------------


async def create(gateway: Gateway, body: BatchRequest) -> dict:
    store, files = BatchStore(gateway), FileStore(gateway)
    meta = await files.meta(body.input_file_id)
    if meta["purpose"] != "batch":
        raise bad_request(f"file {body.input_file_id} has purpose {meta['purpose']}, not batch",
                          "input_file_id")
    lines, errors = parse_input(await files.content(body.input_file_id), body.endpoint)
    batch_id = f"batch_{uuid.uuid4().hex}"
    created = int(time.time())
    fields = {
        "endpoint": body.endpoint, "input_file_id": body.input_file_id,
        "completion_window": body.completion_window, "created_at": created,
        "expires_at": created + COMPLETION_WINDOW_S, "total": len(lines), "submitted": 0,
        "completed": 0, "failed": 0, "metadata": json.dumps(body.metadata or {}),
    }
    if errors:
        fields.update(status="failed", failed_at=created,
                      errors=json.dumps({"object": "list", "data": errors[:100]}))
    else:
        fields.update(status="in_progress", in_progress_at=created)
    async with gateway.redis.pipeline(transaction=True) as pipe:
        pipe.hset(store.key(batch_id), mapping=fields)
        pipe.zadd(gateway.keys.gateway_batches, {batch_id: created})
        if not errors:
            pipe.sadd(gateway.keys.gateway_active_batches, batch_id)
        await pipe.execute()
    return await store.get(batch_id)


async def cancel(gateway: Gateway, batch_id: str) -> dict:
    store = BatchStore(gateway)
    await store.fields(batch_id)  # 404 for an unknown batch
    await store.move(batch_id, "cancelling", "cancelling_at", "validating", "in_progress")
    return await store.get(batch_id)


async def listing(gateway: Gateway) -> dict:
    ids = await gateway.redis.zrevrange(gateway.keys.gateway_batches, 0, 99)
    store = BatchStore(gateway)
    return {"object": "list", "data": [await store.get(i.decode()) for i in ids],
            "has_more": False}


# ----- the driver ---------------------------------------------------------------------------


async def drive_forever(gateway: Gateway) -> None:
    """Every `batch_poll_s`: renew the leases held, take those of active batches nobody
    drives, and drive each in its own task while its lease holds."""
    running: dict[str, asyncio.Task] = {}
    log_error = _error_logger()
    try:
        while True:
            try:
                for raw in await gateway.redis.smembers(gateway.keys.gateway_active_batches):
                    batch_id = raw.decode()
                    task = running.get(batch_id)
                    mine = await take_lease(gateway, batch_id)  # renews it if held
                    if task is not None and not task.done():
                        if not mine:  # another gateway drives it now: stop following it
                            task.cancel()
                    elif mine:
                        running[batch_id] = asyncio.create_task(
                            BatchRun(gateway, batch_id).run())
                for batch_id, task in list(running.items()):
                    if task.done():
                        del running[batch_id]
                        if not task.cancelled() and task.exception() is not None:
                            log_error(batch_id, task.exception())
            except Exception as exc:  # noqa: BLE001 - Redis away: try again next period
                log_error(None, exc)
            await asyncio.sleep(gateway.config.batch_poll_s)
    finally:
        for task in running.values():
            task.cancel()


def _error_logger():
    import structlog

    log = structlog.get_logger("orcd.gateway")

    def note(batch_id: str | None, exc: BaseException) -> None:
        log.warning("batch.driver_error", batch_id=batch_id, error=one_line(exc),
                    narration=f"Batch driver: {one_line(exc)}; will retry")
    return note


async def take_lease(gateway: Gateway, batch_id: str) -> bool:
    """Take the batch's lease, or keep it if this gateway holds it."""
    key = gateway.keys.gateway_batch_lease(batch_id)
    ms = int(gateway.config.batch_lease_s * 1000)
    me = gateway.config.gateway_id
    if await gateway.redis.set(key, me, nx=True, px=ms):
        return True
    holder = await gateway.redis.get(key)
    if holder is not None and holder.decode() == me:
        await gateway.redis.pexpire(key, ms)
        return True
    return False


class BatchRun:
    """One gateway driving one batch until it ends (`drive_forever` cancels it when the lease
    is lost)."""

    def __init__(self, gateway: Gateway, batch_id: str) -> None:
        self.gateway, self.batch_id = gateway, batch_id
        self.store = BatchStore(gateway)
        self.window = asyncio.Semaphore(max(1, gateway.config.batch_window))
        self.following: dict[int, asyncio.Task] = {}
        self.calls: dict[int, Call] = {}

    async def run(self) -> None:
        gateway, store = self.gateway, self.store
        fields = await store.fields(self.batch_id)
        endpoint = fields["endpoint"]
        content = await FileStore(gateway).content(fields["input_file_id"])
        lines, _ = parse_input(content, endpoint)
        answered = {int(k) for k in await gateway.redis.hkeys(
            gateway.keys.gateway_batch_results(self.batch_id))}
        submitted = int(fields.get("submitted", 0))
        try:
            # Lines submitted before a restart: follow them again from their first event.
            for number in range(submitted):
                if number not in answered:
                    await self._follow(endpoint, number, lines[number])
            number = submitted
            while number < len(lines):
                if await self._cancelling():
                    break
                await self.window.acquire()
                try:
                    await self._submit(endpoint, number, lines[number])
                except BaseException:
                    self.window.release()
                    raise
                number += 1
            while any(not task.done() for task in self.following.values()):
                if await self._cancelling():
                    await gateway.cancel([job_id for n, task in self.following.items()
                                          if not task.done()
                                          for job_id in self.calls[n].job_ids()])
                await asyncio.wait([t for t in self.following.values() if not t.done()],
                                   timeout=gateway.config.batch_poll_s)
            for task in self.following.values():
                task.result()  # a follower's error ends this run; the next one retries
            await self.finish()
        finally:
            for task in self.following.values():
                task.cancel()

    async def _cancelling(self) -> bool:
        status = await self.gateway.redis.hget(self.store.key(self.batch_id), "status")
        return status is not None and status.decode() == "cancelling"

    async def _submit(self, endpoint: str, number: int, item: dict) -> None:
        """Submit line `number` (exactly once), then follow it."""
        try:
            call = await line_call(self.gateway, endpoint, self.batch_id, number, item["body"])
            await self._check_model(call.body.model)
        except APIError as exc:
            self.window.release()
            await self.store.record(self.batch_id, number,
                                    self._error_line(number, item, exc.status, exc.body()),
                                    ok=False)
            await self.store.submit_line(self.batch_id, number, [], [])
            return
        streams = [await self.gateway.client.stream_for(c.job.model, c.job.session_id)
                   for c in call.choices]
        if await self.store.submit_line(self.batch_id, number, streams,
                                        [encode_job(c.job) for c in call.choices]):
            self.gateway.metrics.jobs.labels("batch").inc(len(call.choices))
        self._start(call, number, item)

    async def _check_model(self, model: str) -> None:
        """404 for a model never served; a model whose workers are away now keeps its lines
        queued for them (a batch has hours, not seconds)."""
        try:
            await self.gateway.check_model(model)
        except APIError as exc:
            if exc.status != 503:
                raise

    async def _follow(self, endpoint: str, number: int, item: dict) -> None:
        await self.window.acquire()
        try:
            call = await line_call(self.gateway, endpoint, self.batch_id, number, item["body"])
        except APIError:
            self.window.release()
            return  # its error line was recorded before it counted as submitted
        self._start(call, number, item)

    def _start(self, call: Call, number: int, item: dict) -> None:
        self.calls[number] = call
        self.following[number] = asyncio.create_task(self._answer(call, number, item))

    async def _answer(self, call: Call, number: int, item: dict) -> None:
        """Read the line's jobs to their end and record its result."""
        try:
            states = [ChoiceState(choice) for choice in call.choices]
            async for position, update in follow_jobs(self.gateway.client, call.job_ids(),
                                                      None):
                call.apply(states[position], update)
                if isinstance(update, Failed):
                    await self.gateway.cancel(call.job_ids())
                    break
            failed = next((s.failed for s in states if s.failed is not None), None)
            if failed is not None:
                status = failure_status(failed)
                line = self._error_line(number, item, status, error_body(
                    status, f"{failed.code}: {failed.message}", None, failed.code))
                await self.store.record(self.batch_id, number, line, ok=False)
                return
            response = call.response(states)
            self.gateway.metrics.completion_tokens.inc(response["usage"]["completion_tokens"])
            await self.store.record(self.batch_id, number, {
                "id": f"batch_req_{self.batch_id}_{number}", "custom_id": item["custom_id"],
                "response": {"status_code": 200, "request_id": call.request_id,
                             "body": response}, "error": None}, ok=True)
        finally:
            self.window.release()

    def _error_line(self, number: int, item: dict, status: int, body: dict) -> dict:
        return {"id": f"batch_req_{self.batch_id}_{number}", "custom_id": item["custom_id"],
                "response": {"status_code": status, "request_id": f"{self.batch_id}-{number}",
                             "body": body}, "error": None}

    async def finish(self) -> None:
        """Write the output and error files (line order) and end the batch."""
        gateway, store = self.gateway, self.store
        results = await gateway.redis.hgetall(gateway.keys.gateway_batch_results(self.batch_id))
        ordered = sorted((int(k), json.loads(v)) for k, v in results.items())
        output = [r for _, r in ordered if r["response"]["status_code"] == 200]
        errors = [r for _, r in ordered if r["response"]["status_code"] != 200]
        files = FileStore(gateway)
        update = {}
        if output:
            update["output_file_id"] = f"file-{self.batch_id}-output"
            await files.put(update["output_file_id"], _jsonl(output),
                            f"{self.batch_id}_output.jsonl", "batch_output")
        if errors:
            update["error_file_id"] = f"file-{self.batch_id}-errors"
            await files.put(update["error_file_id"], _jsonl(errors),
                            f"{self.batch_id}_errors.jsonl", "batch_output")
        key = store.key(self.batch_id)
        now = int(time.time())
        async with gateway.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={**update, "finalizing_at": now})
            await pipe.execute()
        if not await store.move(self.batch_id, "cancelled", "cancelled_at", "cancelling"):
            await store.move(self.batch_id, "completed", "completed_at", "in_progress",
                             "validating", "finalizing")
        async with gateway.redis.pipeline(transaction=True) as pipe:
            pipe.srem(gateway.keys.gateway_active_batches, self.batch_id)
            pipe.delete(gateway.keys.gateway_batch_lease(self.batch_id))
            await pipe.execute()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
