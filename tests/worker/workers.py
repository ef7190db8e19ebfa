"""Worker processes for integration tests: `orcd worker` subprocesses on a test Redis, with
fast heartbeats and reclaim so that failure scenarios play out in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jobs.keys import Keys
from jobs.redis_url import connect


class WorkerProcess:
    """`orcd worker` in float32 unless `extra` names a --dtype: the tests compare its answers
    with the engine's float32 reference (the command's own default is auto: int8 on a CPU)."""

    def __init__(self, url: str, worker_id: str, log_dir: Path, *extra: str,
                 launcher: tuple[str, ...] = ("worker.cli",),
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        """`launcher`: the module run with `-m` and its leading arguments (the real CLI, or a
        test wrapper such as tests.worker.slow_worker); `env`: variables added to ours."""
        self.url, self.worker_id = url, worker_id
        self.keys = Keys(extra[extra.index("--prefix") + 1]) if "--prefix" in extra else Keys()
        if "--dtype" not in extra:
            extra = ("--dtype", "float32", *extra)
        self.log_path = log_dir / f"{worker_id}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", *launcher, "worker", "--redis", url, "--id", worker_id,
             "--heartbeat", "0.2", "--reclaim-idle", "1", "--kv-blocks", "512", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"), env=env,
        )

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        r = connect(self.url)
        deadline = time.monotonic() + timeout
        while not r.exists(self.keys.worker(self.worker_id)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.worker_id} did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.process.wait(30)
