"""API keys: `--api-keys-file`, one key a line, in plain text or as its SHA-256.

    sk-team-a-6f2c...                         a key in plain text
    sha256:9f86d081884c7d659a2feaa0c55ad015...  the hex SHA-256 of a key (the file holds no secret)
    sk-team-b-11aa...  rpm=60 tpm=20000 streams=4   per-key limits (else the gateway's flags)

Blank lines and lines starting with `#` are skipped. Keys are compared by their hash, so a
lookup costs the same whatever the key. A key's id in Redis (its limits' counters) is the first
16 hex digits of its hash: the key itself is never written anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from jobs.errors import OrcdError

HASH_PREFIX = "sha256:"
LIMIT_NAMES = {"rpm": "requests_per_min", "tpm": "tokens_per_min", "streams": "streams"}


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; 0 = unlimited."""

    requests_per_min: int = 0
    tokens_per_min: int = 0
    streams: int = 0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the key's id (or `anonymous` under --no-auth) and its limits."""

    key_id: str
    limits: Limits


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The keys a gateway accepts, by hash, each with its limits."""

    def __init__(self, limits_by_hash: dict[str, Limits]) -> None:
        self._by_hash = limits_by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: str | Path, defaults: Limits) -> ApiKeys:
        """Read a keys file (module docstring); an unreadable or empty file is an error."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise OrcdError(f"API keys file {path}: {exc.strerror or exc}") from None
        keys: dict[str, Limits] = {}
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            first, options = words[0], words[1:]
            if first.startswith(HASH_PREFIX):
                digest = first[len(HASH_PREFIX):].lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise OrcdError(f"API keys file {path}, line {number}: sha256: needs 64 "
                                    "hex digits")
            else:
                digest = key_hash(first)
            keys[digest] = _limits(options, defaults, f"API keys file {path}, line {number}")
        if not keys:
            raise OrcdError(f"API keys file {path} holds no key")
        return cls(keys)

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller an `Authorization: Bearer KEY` header names; None for a bad key."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = key_hash(token.strip())
        limits = self._by_hash.get(digest)
        return None if limits is None else Caller(digest[:16], limits)


def _limits(options: list[str], defaults: Limits, where: str) -> Limits:
    limits = defaults
    for option in options:
        name, _, value = option.partition("=")
        if name not in LIMIT_NAMES or not value.isdigit():
            raise OrcdError(f"{where}: {option!r} is not rpm=N, tpm=N or streams=N")
        limits = replace(limits, **{LIMIT_NAMES[name]: int(value)})
    return limits
