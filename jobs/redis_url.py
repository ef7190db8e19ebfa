"""Redis URLs every orcd process takes: what `redis.Redis.from_url` takes (`redis://`,
`rediss://` with TLS, `user:password@` for ACL users, `unix://`), plus Redis Sentinel:

    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
    rediss+sentinel://...            (TLS to the primary and the sentinels)

A Sentinel URL gives a client whose connection pool asks the sentinels for the current
primary, and asks again after a connection error: after a failover, workers and clients follow
the new primary on their next call. The password, if any, is the primary's (and replicas');
the sentinels are reached without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from jobs.errors import JobError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a Sentinel URL; `JobError` names what is wrong with a malformed one."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise JobError(f"not a Sentinel URL (redis+sentinel://...): {url!r}")
    credentials, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if credentials:
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise JobError(f"Sentinel URL: {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise JobError("Sentinel URL: the path must be /service_name or /service_name/db")
    if len(path) == 2 and not path[1].isdigit():
        raise JobError(f"Sentinel URL: database {path[1]!r} is not a number")
    return SentinelURL(tuple(hosts), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       username, password, parts.scheme.startswith("rediss"))


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for `url` (module docstring); `options` go to the client (timeouts, retry)."""
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **options)
    return _primary_of(Sentinel, url, options)


def connect_async(url: str, **options: Any) -> aioredis.Redis:
    """`connect` for asyncio clients."""
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, **options)
    return _primary_of(AsyncSentinel, url, options)


def _primary_of(sentinel_class: type, url: str, options: dict[str, Any]):
    """The primary's client through the sentinels of a Sentinel URL (sync or asyncio class);
    the timeouts also apply to the connections to the sentinels themselves."""
    parsed = parse_sentinel_url(url)
    connection = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout")
                  if key in options}
    sentinel = sentinel_class(list(parsed.hosts),
                              sentinel_kwargs={**connection, "ssl": parsed.ssl}, **connection)
    return sentinel.master_for(parsed.service, db=parsed.db, username=parsed.username,
                               password=parsed.password, ssl=parsed.ssl, **options)
