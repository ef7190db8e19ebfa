"""The FastAPI application: routes, authentication, error shapes, body limits, metrics.

Bodies are read and validated here (pydantic, then the job contract), never by FastAPI's own
machinery, so that every refusal has OpenAI's error shape. `/health` and `/metrics` need no key;
everything under `/v1` does unless the gateway runs with --no-auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from gateway import batch_driver, batches, completions, files
from gateway.auth import Caller
from gateway.errors import APIError, error_body
from gateway.requests import BatchRequest, ChatCompletionRequest, CompletionRequest
from gateway.service import Gateway, GatewayConfig
from jobs.client import one_line

Body = TypeVar("Body", bound=BaseModel)
ANONYMOUS = "anonymous"


def create_app(config: GatewayConfig, *, run_batches: bool = True) -> FastAPI:
    """The gateway's ASGI app; with `run_batches`, it also drives the Batch API's batches."""
    gateway = Gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        driver = asyncio.create_task(batch_driver.drive_forever(gateway)) if run_batches else None
        try:
            yield
        finally:
            if driver is not None:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver
            await gateway.close()

    app = FastAPI(title="orcd gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse(error_body(503, f"the job queue (Redis) is unavailable: "
                                       f"{one_line(exc)}", None, "queue_unavailable"),
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: "
                                       f"{one_line(exc)}", None, "internal_error"), 500)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(404, f"no such endpoint: {request.method} "
                                       f"{request.url.path}", None, "unknown_url"), 404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(405, f"{request.method} is not allowed on "
                                       f"{request.url.path}", None, "method_not_allowed"), 405)

    def caller(request: Request) -> Caller:
        if config.api_keys is None:
            return Caller(ANONYMOUS, config.default_limits)
        found = config.api_keys.caller(request.headers.get("authorization"))
        if found is None:
            raise APIError(401, "Incorrect API key provided: send Authorization: Bearer KEY "
                           "with a key this gateway accepts", None, "invalid_api_key")
        return found

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        who = caller(request)
        body = await parse(request, ChatCompletionRequest)
        return await completions.chat_completions(gateway, request, who, body)

    @app.post("/v1/completions")
    async def complete(request: Request):
        who = caller(request)
        body = await parse(request, CompletionRequest)
        return await completions.completions(gateway, request, who, body)

    @app.get("/v1/models")
    async def models(request: Request):
        caller(request)
        served = await gateway.models()
        return {"object": "list", "data": [model_object(name, started)
                                           for name, started in sorted(served.items())]}

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str):
        caller(request)
        served = await gateway.models()
        if model not in served:
            raise APIError(404, f"The model {model} does not exist or no worker serves it",
                           "model", "model_not_found")
        return model_object(model, served[model])

    # Files and batches belong to the key that made them (`Caller.key_id`).
    @app.post("/v1/files")
    async def upload(request: Request):
        return await files.upload(gateway, request, caller(request).key_id)

    @app.get("/v1/files")
    async def list_files(request: Request):
        return await files.listing(gateway, caller(request).key_id)

    @app.get("/v1/files/{file_id}")
    async def file_info(request: Request, file_id: str):
        return await files.FileStore(gateway, caller(request).key_id).meta(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str):
        store = files.FileStore(gateway, caller(request).key_id)
        return Response(await store.content(file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str):
        await files.FileStore(gateway, caller(request).key_id).delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        owner = caller(request).key_id
        return await batches.create(gateway, await parse(request, BatchRequest), owner)

    @app.get("/v1/batches")
    async def list_batches(request: Request):
        return await batches.listing(gateway, caller(request).key_id)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str):
        return await batches.BatchStore(gateway, caller(request).key_id).get(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str):
        return await batches.cancel(gateway, batch_id, caller(request).key_id)

    @app.get("/health")
    async def health():
        if await gateway.redis_ok():
            return {"status": "ok"}
        return JSONResponse(error_body(503, "Redis does not answer", None, "queue_unavailable"),
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(gateway.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return Guard(app, gateway)


def model_object(name: str, started: float) -> dict:
    return {"id": name, "object": "model", "created": int(started), "owned_by": "orcd"}


async def parse(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as `model`; a 400 naming the first bad parameter otherwise."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": ""}
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", None,
                           "invalid_json") from None
        param = ".".join(str(part) for part in first["loc"]) or None
        what = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise APIError(400, f"{param or 'body'}: {what}{more}", param,
                       "unknown_parameter" if first["type"] == "extra_forbidden"
                       else "invalid_value") from None


def endpoint_label(path: str) -> str:
    """The route a path belongs to, ids replaced, so metrics keep few label values."""
    parts = path.rstrip("/").split("/")
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] in ("files", "batches", "models"):
        parts[3] = "{id}"
    label = "/".join(parts) or "/"
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{id}",
             "/v1/files", "/v1/files/{id}", "/v1/files/{id}/content", "/v1/batches",
             "/v1/batches/{id}", "/v1/batches/{id}/cancel", "/health", "/metrics")
    return label if label in known else "other"


class Guard:
    """ASGI middleware in front of the app: body size limits (413 before the body is read
    when Content-Length says so, else as it arrives) and the request metrics."""

    def __init__(self, app: FastAPI, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config: GatewayConfig = self.gateway.config
        path = scope["path"]
        limit = config.max_file_bytes if path == "/v1/files" else config.max_body_bytes
        label = endpoint_label(path)
        started = time.perf_counter()
        status = {"code": 500}

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await self._too_large(tracked_send, limit)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise APIError(413, f"the body is over {limit} bytes", None,
                                       "request_too_large")
                return message

            await self.app(scope, limited_receive, tracked_send)
        finally:
            metrics = self.gateway.metrics
            metrics.requests.labels(label, str(status["code"])).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        body = json.dumps(error_body(413, f"the body is over {limit} bytes", None,
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
