"""bench/serve.py end to end on the CPU: a tiny synthetic model, the engine phase, a private
redis-server, a real `orcd worker`, closed and open loops through the wire contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.slow


def test_serve_bench_runs_on_the_cpu_and_loses_nothing(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "serve.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench/serve.py"), "--backend", "torch", "--shape",
         "smollm2-135m", "--quant", "Q8_0", "--layers", "2", "--clients", "1,3", "--rates",
         "6", "--open-jobs", "5", "--prompt-tokens", "16,48", "--output-tokens", "4,12",
         "--jobs-per-client", "2", "--multi-turn", "0.5", "--json", str(out)],
        check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["mode"], r.get("clients", r.get("rate"))) for r in rows] == \
        [("closed", 1), ("closed", 3), ("open", 6.0)]
    for row in rows:
        assert row["errors"] == 0 and row["lost"] == 0 and row["streamed_text_mismatch"] == 0
        assert row["completion_tokens"] > 0 and row["ttft_ms_p50"] > 0
    closed = rows[:2]
    # Multi-turn: second turns were submitted (more jobs than first turns) and reused KV.
    assert closed[1]["jobs"] > 6 and sum(r["cached_tokens"] for r in rows) > 0
    assert all(r["engine_tok_s"] > 0 and "worker_overhead_pct" in r for r in closed)
    # The steady window (every client busy) ends before the run and streamed some tokens.
    for row in closed:
        assert 0 < row["steady_seconds"] <= row["seconds"]
        assert row["steady_tok_s"] > 0 and row["engine_steady_tok_s"] > 0
        assert "steady_overhead_pct" in row
    assert rows[2]["steady_tok_s"] is None  # an open loop has no such window
    if sys.platform == "linux":  # CPU use per row, from /proc (the worker computed the tokens)
        assert all(r["client_cpu_pct"] >= 0 and r["worker_cpu_pct"] > 0 for r in closed)
        assert all("engine_cpu_pct" not in r for r in closed)  # torch: no engine process
