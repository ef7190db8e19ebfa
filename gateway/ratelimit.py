"""Per-key limits shared by every gateway: requests/min, tokens/min, concurrent streams.

All state is in Redis and each admission is one Lua script, so gateways behind a load balancer
enforce one limit together and two requests never both take the last slot. Minutes are fixed
60-second windows (`orcd:gw:rate:{key}:{requests|tokens}:{minute}`, expiring after two).
Tokens are charged when a request ends (prompt + completion) and a request is refused while
the key's minute is spent; the worker, not the gateway, knows the token counts. Open streams
are members of a sorted set scored by a lease that the stream renews, so a gateway that dies
does not hold its streams' slots for longer than one lease.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.auth import Caller
from jobs.keys import Keys

WINDOW_S = 60
STREAM_LEASE_MS = 60_000  # a stream renews its slot every STREAM_LEASE_MS / 3

# KEYS: requests counter, tokens counter, streams set. ARGV: requests/min, tokens/min,
# streams, stream member ('' for a request that is no stream), lease ms, counter TTL s.
# Returns 0 (admitted), 1 (requests/min spent), 2 (tokens/min spent), 3 (streams all open).
_ADMIT = """
local rpm, tpm, streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm then return 2 end
if rpm > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm then return 1 end
if streams > 0 and ARGV[4] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= streams then return 3 end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]) * 2)
end
if rpm > 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
end
return 0
"""
# KEYS: streams set. ARGV: member, lease ms.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""
REASONS = {1: "requests per minute", 2: "tokens per minute", 3: "concurrent streams"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused and when to try again."""

    what: str
    retry_after_s: int


class RateLimiter:
    """Admission against a caller's limits, and the bookkeeping after it."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._admit = redis.register_script(_ADMIT)
        self._renew = redis.register_script(_RENEW)

    async def admit(self, caller: Caller, stream_member: str | None) -> Refusal | None:
        """None when admitted (a stream then holds a slot until `release`)."""
        limits = caller.limits
        if not (limits.requests_per_min or limits.tokens_per_min or limits.streams):
            return None
        now = time.time()
        window = int(now // WINDOW_S)
        code = await self._admit(
            keys=[self.keys.gateway_rate(caller.key_id, "requests", window),
                  self.keys.gateway_rate(caller.key_id, "tokens", window),
                  self.keys.gateway_streams(caller.key_id)],
            args=[limits.requests_per_min, limits.tokens_per_min, limits.streams,
                  stream_member or "", STREAM_LEASE_MS, 2 * WINDOW_S])
        if code == 0:
            return None
        wait = 1 if code == 3 else max(1, math.ceil((window + 1) * WINDOW_S - now))
        return Refusal(REASONS[int(code)], wait)

    async def charge_tokens(self, caller: Caller, tokens: int) -> None:
        if not caller.limits.tokens_per_min or tokens <= 0:
            return
        key = self.keys.gateway_rate(caller.key_id, "tokens", int(time.time() // WINDOW_S))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, 2 * WINDOW_S)
            await pipe.execute()

    async def renew(self, caller: Caller, member: str) -> None:
        if caller.limits.streams:
            await self._renew(keys=[self.keys.gateway_streams(caller.key_id)],
                              args=[member, STREAM_LEASE_MS])

    async def release(self, caller: Caller, member: str) -> None:
        if caller.limits.streams:
            await self.redis.zrem(self.keys.gateway_streams(caller.key_id), member)
