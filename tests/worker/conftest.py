"""Fixtures for worker integration tests (the private redis-server is tests/conftest.py's)."""

from __future__ import annotations

import pytest

from gpu.request import Request, SamplingParams
from jobs.limits import DEFAULT_MODEL
from worker.loaded_model import load_model


@pytest.fixture(scope="module")
def reference():
    """Greedy answers of the default model computed one at a time by the engine itself: the
    single-worker truth (one engine per test module)."""
    try:
        model = load_model(DEFAULT_MODEL, kv_blocks=256, progress=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {exc}")
    cache: dict[tuple[str, int], str] = {}

    def answer(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            tokenizer, engine = model.tokenizer, model.engine
            ids = tokenizer.encode(prompt, parse_special=False)
            engine.add(Request("ref", ids, SamplingParams(temperature=0), max_tokens=max_tokens,
                               stop_token_ids=tokenizer.end_of_generation_ids))
            out: list[int] = []
            while engine.has_work():
                for step in engine.step():
                    out += step.new_token_ids
            cache[prompt, max_tokens] = tokenizer.decode(out, skip_special_tokens=True)
        return cache[prompt, max_tokens]

    return answer
