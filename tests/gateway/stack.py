"""A live gateway for tests: `orcd gateway` in a subprocess on a free port, over a test Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_server import free_port

ENV = {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ORCD_API_KEYS_FILE")},
       "OMP_NUM_THREADS": "1"}


class GatewayProcess:
    """`orcd gateway` with its stderr in a file; `wait_ready` polls /health."""

    def __init__(self, redis_url: str, log_dir: Path, name: str, *extra: str,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / f"{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "gateway", "--redis", redis_url,
             "--port", str(self.port), "--id", name, *extra],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"), env=ENV)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
