"""`--dtype auto|float32|bfloat16|int8`: auto (the serving commands' default) is int8 on the
torch backend and reaches the engine as a concrete dtype; perplexity defaults to float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gpu.int8_linear import Int8Weight
from worker import loaded_model
from worker.cli import build_parser
from worker.commands import worker as worker_command
from worker.loaded_model import AUTO_TORCH_DTYPE, resolve_dtype


@pytest.mark.parametrize(("argv", "dtype"), [
    (["generate", "hi"], "auto"),
    (["worker"], "auto"),
    (["demo"], "auto"),
    (["perplexity", "text.txt"], "float32"),
    (["generate", "--dtype", "bfloat16", "hi"], "bfloat16"),
    (["worker", "--dtype", "int8"], "int8"),
    (["demo", "--dtype", "float32"], "float32"),
    (["perplexity", "--dtype", "auto", "text.txt"], "auto"),
])
def test_dtype_defaults_and_choices(argv, dtype):
    assert build_parser().parse_args(argv).dtype == dtype


def test_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--dtype", "float16"])
    assert "invalid choice" in capsys.readouterr().err


def test_auto_is_int8_on_the_torch_backend_and_ignored_by_cuda(monkeypatch):
    assert AUTO_TORCH_DTYPE == "int8"
    assert resolve_dtype("auto", "torch") == "int8"
    assert resolve_dtype("auto", "cuda") == "float32"  # the engine's default; cuda ignores it
    for explicit in ("float32", "bfloat16", "int8"):
        assert resolve_dtype(explicit, "torch") == explicit
        assert resolve_dtype(explicit, "cuda") == explicit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "auto") == "int8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto", "auto") == "float32"


class _Served(Exception):
    """Raised by the stand-in Worker: the test needs the loaded model, not a daemon."""


def _worker_model(monkeypatch, flags: list[str]):
    """Run `orcd worker FLAGS` up to the daemon and return the model it would serve."""
    seen = {}

    class FakeWorker:
        def __init__(self, model, config, metrics=None):
            seen["model"] = model

        def run(self):
            raise _Served

    monkeypatch.setattr(worker_command, "Worker", FakeWorker)
    monkeypatch.setattr(worker_command, "freeze_startup_objects", lambda: 0)
    args = build_parser().parse_args(["worker", "--backend", "torch", "--kv-blocks", "16", *flags])
    with pytest.raises(_Served):
        args.run(args)
    return seen["model"]


@pytest.mark.parametrize(("flags", "dtype"), [
    ([], "int8"), (["--dtype", "int8"], "int8"), (["--dtype", "float32"], "float32"),
])
def test_worker_dtype_reaches_the_torch_backend(monkeypatch, default_model_path, flags, dtype):
    model = _worker_model(monkeypatch, flags)
    backend = model.engine.backend
    assert backend.name == "torch" and model.dtype == dtype
    wqkv = backend.weights.layers[0].wqkv
    if dtype == "int8":
        assert isinstance(wqkv, Int8Weight) and backend.dtype == torch.bfloat16
    else:
        assert wqkv.dtype == torch.float32 and backend.dtype == torch.float32


def test_load_model_keeps_the_engines_float32_default(monkeypatch):
    """The library call stays the reference: only the commands default to auto."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(gguf, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(loaded_model, "resolve_model", lambda name, models_dir: name)
    monkeypatch.setattr(loaded_model, "open_gguf", lambda path: SimpleNamespace(metadata={}))
    monkeypatch.setattr(loaded_model.GGUFTokenizer, "from_metadata", lambda metadata: None)
    monkeypatch.setattr(loaded_model, "Engine", fake_engine)
    with pytest.raises(Stop):
        loaded_model.load_model("m", backend="torch", progress=False)
    assert seen["dtype"] == "float32"
    with pytest.raises(Stop):
        loaded_model.load_model("m", backend="torch", dtype="auto", progress=False)
    assert seen["dtype"] == "int8"
