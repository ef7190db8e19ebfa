"""Fixtures for the gateway's tests: a private redis-server; and, shared by the modules that
need one (all in xdist group `gateway`, so on one xdist worker), a redis-server with a real
`orcd worker` (torch backend, the default model, int8 weights: the fastest on a CPU)."""

from __future__ import annotations

import shutil

import pytest

from tests.redis_server import RedisServer
from tests.worker.workers import WorkerProcess


@pytest.fixture(scope="session")
def worker_stack(tmp_path_factory, default_model_path):
    """(redis_server, directory) with one live worker; its Redis is shared, so tests use keys
    of their own (job ids, sessions, API keys)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    directory = tmp_path_factory.mktemp("gateway-stack")
    redis_server = RedisServer(directory).start()
    worker = WorkerProcess(redis_server.url, "gw-worker", directory, "--backend", "torch",
                           "--dtype", "int8")
    try:
        worker.wait_ready()
        yield redis_server, directory
    finally:
        worker.stop()
        redis_server.kill()
