"""Lua scripts the worker runs inside its pipelines, called by SHA (EVALSHA) alone.

redis-py's `Script` in a pipeline asks Redis `SCRIPT EXISTS` before every `execute`: one more
round trip per loop iteration, each time a flush carries a final event or the admission call.
Here the scripts are loaded once, when a call is first queued (`LuaScript.queue`, with an
immediate SCRIPT LOAD: queue inside the `RedisLink.call` that sends the pipeline), and again
only after Redis answered NOSCRIPT (a restart or a SCRIPT FLUSH) or a reconnect: whoever sees
one marks the set `missing` (`refused`) and sends the refused calls again. A NOSCRIPT inside
MULTI/EXEC fails that command alone, before it did anything.
"""

from __future__ import annotations

from hashlib import sha1

import redis
from redis.exceptions import NoScriptError


class LuaScript:
    """One script of a `ScriptSet`; `queue` adds a call to a pipeline."""

    def __init__(self, source: str, scripts: ScriptSet) -> None:
        self.source = source
        self.sha = sha1(source.encode()).hexdigest()
        self.scripts = scripts

    def queue(self, pipe: redis.client.Pipeline, keys: list, args: list) -> None:
        """Queue EVALSHA, loading the set first if Redis may lack it (redis-py's connection
        errors come from here then)."""
        self.scripts.ensure()
        pipe.evalsha(self.sha, len(keys), *keys, *args)


class ScriptSet:
    """The scripts of one Redis client, loaded together when any may be missing."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.scripts: list[LuaScript] = []
        self.missing = True

    def add(self, source: str) -> LuaScript:
        script = LuaScript(source, self)
        self.scripts.append(script)
        self.missing = True
        return script

    def ensure(self) -> None:
        """Load the scripts if Redis may lack them (raises redis-py's connection errors)."""
        if self.missing:
            for script in self.scripts:
                self.client.script_load(script.source)
            self.missing = False

    def refused(self, result: object) -> bool:
        """Whether a pipeline result is a NOSCRIPT (the scripts are then marked missing)."""
        if isinstance(result, NoScriptError):
            self.missing = True
            return True
        return False
