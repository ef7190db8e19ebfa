"""`orcd generate` and `orcd perplexity` as a user runs them, on the real default model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

LICENSE = "/usr/share/common-licenses/Apache-2.0"


def orcd(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_answers_sensibly(default_model_path):
    result = orcd("generate", "--json", "--max-tokens", "24", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(out["token_ids"]) <= 24
    assert "model.loaded" in result.stderr


def test_generate_streams_and_stop_string(default_model_path):
    result = orcd("generate", "--max-tokens", "24", "--stop", "Paris",
                  "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" not in result.stdout and result.stdout.strip()


def test_generate_raw_length(default_model_path):
    result = orcd("generate", "--raw", "--json", "--max-tokens", "5", "Once upon a time")
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5


def test_generate_with_a_response_format(default_model_path):
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 20}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    result = orcd("generate", "--json", "--max-tokens", "24", "--response-format",
                  json.dumps(response_format), "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert json.loads(out["text"]) == {"city": "Paris"} and out["finish_reason"] == "stop"
    bad = orcd("generate", "--response-format", '{"type": "regex", "pattern": "(?=x)"}', "hi")
    assert bad.returncode == 2 and "look-around" in bad.stderr and "model.loaded" not in bad.stderr


def test_generate_unknown_model_exit_2():
    result = orcd("generate", "--model", "nope", "hi")
    assert result.returncode == 2 and "unknown model 'nope'" in result.stderr


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    try:
        text = open(LICENSE, encoding="utf-8").read()[:3000]
    except OSError:
        pytest.skip("no license text on this machine")
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_perplexity_matches_llama_cpp_formula(default_model_path, short_text, smollm2_backend):
    """The CLI's number equals the llama-perplexity formula computed here from raw logits."""
    from gpu.perplexity import chunk_batch
    from tokenizer.tokenizer import load_tokenizer

    n_ctx = 128
    result = orcd("perplexity", "--json", "--ctx", str(n_ctx), str(short_text))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)

    tokenizer = load_tokenizer(default_model_path)
    tokens = tokenizer.encode(short_text.read_text(), add_special_tokens=True, parse_special=False)
    backend = smollm2_backend
    backend.allocate_kv(n_ctx // 16, 16)
    nlls = []
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        first = [tokenizer.bos_id] if tokenizer.add_bos else chunk[:1]  # as llama.cpp does
        logits = backend.forward(chunk_batch(first + chunk[1:], 16, "cpu"))
        logits = logits.double().numpy()
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            log_z = row.max() + math.log(np.exp(row - row.max()).sum())
            nlls.append(log_z - row[chunk[pos + 1]])
    assert got["chunks"] == len(tokens) // n_ctx and got["tokens_scored"] == len(nlls)
    assert got["ppl"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-6)
    expected_error = got["ppl"] * math.sqrt(np.var(nlls) / (len(nlls) - 1))
    assert got["error"] == pytest.approx(expected_error, rel=1e-4)


def test_perplexity_too_short_text(default_model_path, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words")
    result = orcd("perplexity", "--ctx", "128", str(path))
    assert result.returncode == 2 and "need at least 256 tokens" in result.stderr
