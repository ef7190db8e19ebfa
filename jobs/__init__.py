"""The public contract of orcd: job schemas, Redis key names, clients. Never imports torch.

    from jobs import OrcdClient
    done = OrcdClient("redis://localhost:6379/0").generate("Hello", max_tokens=16)

The names below are imported on first use: every package imports `jobs.errors` (the error
root) and `jobs.limits` (shared bounds and defaults), and those must not pull in redis-py.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AsyncOrcdClient": "jobs.async_client",
    "OrcdClient": "jobs.client",
    "JobError": "jobs.errors",
    "JobFailed": "jobs.errors",
    "JobTimeout": "jobs.errors",
    "NoWorker": "jobs.errors",
    "Done": "jobs.events",
    "Error": "jobs.events",
    "Queued": "jobs.events",
    "Started": "jobs.events",
    "Token": "jobs.events",
    "GROUP": "jobs.keys",
    "Keys": "jobs.keys",
    "JobState": "jobs.client",
    "EventFollower": "jobs.protocol",
    "JobEvent": "jobs.protocol",
    "build_job": "jobs.protocol",
    "GenerationJob": "jobs.schema",
    "Message": "jobs.schema",
    "Sampling": "jobs.schema",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
