"""Where every benchmark writes its JSON: bench/results/NAME-DATE.json with machine and commit."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def git_commit() -> str:
    """The commit measured: $ORCD_COMMIT where the caller knows it (the GPU machine's copy of
    the tree carries a .git whose HEAD can be older than the files it runs), else git's HEAD."""
    if os.environ.get("ORCD_COMMIT"):
        return os.environ["ORCD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=RESULTS_DIR.parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, results: dict[str, object], path: Path | None = None) -> Path:
    """Write results with date, machine and commit (to `path`, default
    bench/results/NAME-DATE.json); returns the path."""
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "results": results,
    }
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
