"""Driving batches: submitting their lines, following their jobs, writing their files.

One gateway drives a batch at a time, holding a lease key it renews every poll; when the
holder dies the lease runs out and another gateway (or the same one, restarted) takes over.
The new driver reads the batch's state from Redis: lines below `submitted` are followed again
from their jobs' first events (the job ids derive from the batch and the line), the others are
submitted. Results are written once (`BatchStore.record`), and the output and error files get
ids derived from the batch id, so finishing twice writes the same files. At most
--batch-window lines of a batch are in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import structlog

from gateway.batches import BatchStore, line_call, parse_input
from gateway.completions import Call, ChoiceState, failure_status
from gateway.errors import APIError, error_body
from gateway.files import FileStore
from gateway.follow import Failed, follow_jobs
from gateway.service import Gateway
from jobs.client import one_line
from jobs.protocol import encode_job


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
    log = structlog.get_logger()

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
        self.owner = ""  # the key that created the batch: its output files are that key's

    async def run(self) -> None:
        gateway, store = self.gateway, self.store
        fields = await store.fields(self.batch_id)
        endpoint, self.owner = fields["endpoint"], fields.get("owner", "")
        content = await FileStore(gateway).content(fields["input_file_id"])
        lines, _ = parse_input(content, endpoint)
        answered = {int(k) for k in await gateway.redis.hkeys(
            gateway.keys.gateway_batch_results(self.batch_id))}
        submitted = int(fields.get("submitted", 0))
        structlog.get_logger().info(
            "batch.driving", batch_id=self.batch_id, lines=len(lines), submitted=submitted,
            answered=len(answered),
            narration=f"Driving batch {self.batch_id}: {len(lines)} lines, {submitted} "
                      f"submitted and {len(answered)} answered before")
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
                            f"{self.batch_id}_output.jsonl", "batch_output", self.owner)
        if errors:
            update["error_file_id"] = f"file-{self.batch_id}-errors"
            await files.put(update["error_file_id"], _jsonl(errors),
                            f"{self.batch_id}_errors.jsonl", "batch_output", self.owner)
        key = store.key(self.batch_id)
        now = int(time.time())
        async with gateway.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={**update, "finalizing_at": now})
            await pipe.execute()
        if not await store.move(self.batch_id, "cancelled", "cancelled_at", "cancelling"):
            await store.move(self.batch_id, "completed", "completed_at", "in_progress",
                             "validating", "finalizing")
        status = (await store.fields(self.batch_id))["status"]
        structlog.get_logger().info(
            "batch.finished", batch_id=self.batch_id, status=status, output=len(output),
            errors=len(errors),
            narration=f"Batch {self.batch_id} {status}: {len(output)} answers, "
                      f"{len(errors)} errors")
        async with gateway.redis.pipeline(transaction=True) as pipe:
            pipe.srem(gateway.keys.gateway_active_batches, self.batch_id)
            pipe.delete(gateway.keys.gateway_batch_lease(self.batch_id))
            await pipe.execute()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
