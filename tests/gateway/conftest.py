"""Fixtures for the gateway's tests: a private redis-server."""

from __future__ import annotations

import shutil

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
