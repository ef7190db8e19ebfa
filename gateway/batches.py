"""The Batch API's state and endpoints: files of requests become batches kept in Redis.

A batch is a hash (`orcd:gw:batch:{id}`: status, timestamps, counters, `submitted`) and its
results (`:results`, line index -> result line). All of it is in Redis so that any gateway can
drive it (`gateway.batch_driver`), and moves that must not race are Lua scripts:

- `_SUBMIT` puts a line's jobs on the queue and moves `submitted` only if it still points at
  that line: a line is submitted exactly once, whichever driver tries.
- `_RESULT` records a line's result with HSETNX and moves the counters with it: a line is
  answered exactly once.
- `_STATUS` moves the status only from the statuses allowed (a cancel never revives a batch
  that completed).

Lines run at a low priority (--batch-priority, default -100; a line's body may set its own).
"""

from __future__ import annotations

import json
import re
import time
import uuid

from pydantic import ValidationError

from gateway.auth import Caller, Limits
from gateway.completions import Call
from gateway.errors import APIError, bad_request
from gateway.files import FileStore
from gateway.requests import BatchRequest, ChatCompletionRequest, CompletionRequest
from gateway.service import Gateway
from gateway.translate import chat_choices, completion_choices
from jobs.schema import ID_PATTERN

COMPLETION_WINDOW_S = 24 * 3600
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
    """Reading and moving a batch's state in Redis, seen as `owner` (the API key's id that
    created it; another key gets a 404) or by the gateway itself (None)."""

    def __init__(self, gateway: Gateway, owner: str | None = None) -> None:
        self.gateway, self.redis, self.keys = gateway, gateway.redis, gateway.keys
        self.owner = owner
        self._status = self.redis.register_script(_STATUS)
        self._result = self.redis.register_script(_RESULT)
        self._submit = self.redis.register_script(_SUBMIT)

    def key(self, batch_id: str) -> str:
        if not _ID.match(batch_id):
            raise _missing(batch_id)
        return self.keys.gateway_batch(batch_id)

    async def fields(self, batch_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.key(batch_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields or (self.owner is not None and fields.get("owner") != self.owner):
            raise _missing(batch_id)
        return fields

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


async def create(gateway: Gateway, body: BatchRequest, owner: str) -> dict:
    store, files = BatchStore(gateway, owner), FileStore(gateway, owner)
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
        "owner": owner,
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


async def cancel(gateway: Gateway, batch_id: str, owner: str) -> dict:
    store = BatchStore(gateway, owner)
    await store.fields(batch_id)  # 404 for an unknown batch
    await store.move(batch_id, "cancelling", "cancelling_at", "validating", "in_progress")
    return await store.get(batch_id)


async def listing(gateway: Gateway, owner: str) -> dict:
    ids = await gateway.redis.zrevrange(gateway.keys.gateway_batches, 0, 99)
    store, data = BatchStore(gateway, owner), []
    for batch_id in ids:
        try:
            data.append(await store.get(batch_id.decode()))
        except APIError:
            continue  # another key's
    return {"object": "list", "data": data, "has_more": False}
