"""`orcd worker --no-overlap` reaches the engine; the default keeps the engine's overlap on."""

from __future__ import annotations

import argparse

import pytest

from worker.commands import worker as worker_command


class _Loaded(Exception):
    """Raised by the stand-in loader: the test needs the engine options, not a worker."""


@pytest.mark.parametrize(("flags", "overlap"), [([], True), (["--no-overlap"], False)])
def test_overlap_option_reaches_the_engine(monkeypatch, flags, overlap):
    seen = {}

    def fake_load_model(name, **options):
        seen.update(options)
        raise _Loaded

    monkeypatch.setattr(worker_command, "load_model", fake_load_model)
    parser = argparse.ArgumentParser()
    worker_command.add_arguments(parser)
    with pytest.raises(_Loaded):
        worker_command.run(parser.parse_args(flags))
    assert seen["overlap"] is overlap
