"""`orcd inspect` end to end, as a user runs it: output, exit status, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.loader.test_config import write_tiny_model


def orcd(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, env=env,
        timeout=120,
    )


def test_inspect_default_model_json(default_model_path):
    result = orcd("inspect", "smollm2-135m", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama"
    assert info["config"]["layers"] == 30
    assert info["quant_mix"]["Q4_1"]["tensors"] == 210
    assert info["quant_mix"]["Q8_0"]["tensors"] == 1
    assert info["tokenizer"] == {"model": "gpt2", "pre": "smollm", "tokens": 49152,
                                 "merges": 48900, "chat_template": True}
    assert 134e6 < info["parameters"] < 135e6
    assert len(info["tensors"]) == 272


def test_inspect_text_names_the_essentials(default_model_path):
    result = orcd("inspect", str(default_model_path), "--tensors")
    assert result.returncode == 0, result.stderr
    for fragment in ("architecture    llama", "9 heads, 3 kv heads", "chat template: yes",
                     "blk.29.ffn_down.weight"):
        assert fragment in result.stdout


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOPE" + b"\0" * 40,
                                     b"GGUF\x03\0\0\0" + b"\xff" * 16])
def test_malformed_file_exit_2_one_line(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    result = orcd("inspect", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(bad) in lines[0]


def test_unknown_model_lists_known(tmp_path):
    result = orcd("inspect", "no-such-model", "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert "unknown model 'no-such-model'" in result.stderr and "known:" in result.stderr


def test_models_dir_resolves_name(tmp_path, monkeypatch):
    write_tiny_model(tmp_path / "tiny.gguf", "qwen2")
    env = {**__import__("os").environ, "ORCD_MODELS_DIR": str(tmp_path)}
    result = orcd("inspect", "tiny", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "qwen2"
