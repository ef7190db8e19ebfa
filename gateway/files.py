"""The Files API's store: `POST /v1/files` (JSONL, purpose `batch`), metadata, content, delete.

Metadata always lives in Redis (`orcd:gw:file:{id}`, field `meta`); the content too (field
`content`), unless the gateway runs with --files-dir, where each file is `{dir}/{id}.jsonl`
(every gateway must then see the same directory). Ids are checked against the job contract's
id pattern before they become part of a key or a path. A file belongs to the API key that
uploaded it (its batch's key for output files): another key gets a 404, as for no file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile

from gateway.errors import APIError, bad_request
from gateway.service import Gateway
from jobs.schema import ID_PATTERN

PURPOSES = ("batch",)  # uploads; the gateway itself writes `batch_output` files
_ID = re.compile(ID_PATTERN)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    """Files by id, in Redis or in --files-dir; seen as `owner` (an API key's id), or by the
    gateway itself (None: every file)."""

    def __init__(self, gateway: Gateway, owner: str | None = None) -> None:
        self.gateway, self.redis, self.keys = gateway, gateway.redis, gateway.keys
        self.owner = owner
        self.directory = Path(gateway.config.files_dir) if gateway.config.files_dir else None

    def _path(self, file_id: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{file_id}.jsonl"

    async def put(self, file_id: str, content: bytes, filename: str, purpose: str,
                  owner: str) -> dict:
        """Store a file under `file_id` (writing it again with the same content is harmless)."""
        meta = {"id": file_id, "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "status_details": None}
        fields = {"meta": json.dumps(meta), "owner": owner}
        if self.directory is None:
            fields["content"] = content
        else:
            await asyncio.to_thread(_write_atomically, self._path(file_id), content)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.gateway_file(file_id), mapping=fields)
            pipe.zadd(self.keys.gateway_files, {file_id: meta["created_at"]})
            await pipe.execute()
        return meta

    async def meta(self, file_id: str) -> dict:
        raw, owner = await self.redis.hmget(self._key(file_id), "meta", "owner")
        self._check(file_id, raw, owner)
        return json.loads(raw)

    async def content(self, file_id: str) -> bytes:
        key = self._key(file_id)
        if self.directory is None:
            content, owner = await self.redis.hmget(key, "content", "owner")
            self._check(file_id, content, owner)
            return content
        await self.meta(file_id)
        try:
            return await asyncio.to_thread(self._path(file_id).read_bytes)
        except FileNotFoundError:
            raise APIError(404, f"file {file_id}: its content is gone from the files "
                           "directory", None, "file_not_found") from None

    async def delete(self, file_id: str) -> None:
        key = self._key(file_id)
        await self.meta(file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.zrem(self.keys.gateway_files, file_id)
            await pipe.execute()
        if self.directory is not None:
            await asyncio.to_thread(self._path(file_id).unlink, missing_ok=True)

    def _check(self, file_id: str, value: bytes | None, owner: bytes | None) -> None:
        """404 for a file that is not there, or not the caller's."""
        if value is None or (self.owner is not None and (owner or b"").decode() != self.owner):
            raise _missing(file_id)

    def _key(self, file_id: str) -> str:
        if not _ID.match(file_id):
            raise _missing(file_id)
        return self.keys.gateway_file(file_id)


def _missing(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", "file_id", "file_not_found")


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(content)
    partial.replace(path)


async def upload(gateway: Gateway, request: Request, owner: str) -> dict:
    """A multipart upload: fields `file` (the JSONL) and `purpose`."""
    try:
        form = await request.form()
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors vary
        raise bad_request(f"the body is not a multipart form: {exc}", "file") from None
    purpose, upload_file = form.get("purpose"), form.get("file")
    if purpose not in PURPOSES:
        raise bad_request(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
    if not isinstance(upload_file, UploadFile):
        raise bad_request("a file field named 'file' is required", "file")
    content = await upload_file.read()
    if not content.strip():
        raise bad_request("the file is empty", "file")
    return await FileStore(gateway).put(new_file_id(), content,
                                        upload_file.filename or "upload.jsonl", purpose, owner)


async def listing(gateway: Gateway, owner: str) -> dict:
    ids = await gateway.redis.zrevrange(gateway.keys.gateway_files, 0, 999)
    store, data = FileStore(gateway, owner), []
    for file_id in ids:
        try:
            data.append(await store.meta(file_id.decode()))
        except APIError:
            continue  # another key's, or deleted meanwhile
    return {"object": "list", "data": data, "has_more": False}
