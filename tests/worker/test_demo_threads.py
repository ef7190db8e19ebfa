"""`orcd demo` gives its worker one torch thread on a machine whose CPUs are already busy."""

from __future__ import annotations

import pytest

from worker.commands import demo


@pytest.mark.parametrize(("load", "cpus", "environ", "threads"), [
    (0.3, 2, {}, None),  # quiet: torch's default (all cores)
    (1.9, 2, {}, None),
    (2.0, 2, {}, "1"),  # every core already busy
    (5.7, 2, {}, "1"),
    (5.7, 2, {"OMP_NUM_THREADS": "2"}, "2"),  # the user's choice wins
    (9.0, 1, {}, None),  # one CPU: one thread anyway
    (12.0, 16, {}, None),
])
def test_busy_machine_threads(monkeypatch, load, cpus, environ, threads):
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cpus)
    env, note = demo.busy_machine_threads({"PATH": "/bin", **environ})
    assert env.get("OMP_NUM_THREADS") == threads and env["PATH"] == "/bin"
    assert bool(note) == (threads == "1" and not environ)
    if note:
        assert f"load {load:.1f} on {cpus} CPUs" in note
