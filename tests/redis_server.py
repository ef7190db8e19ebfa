"""A private `redis-server` for integration tests: a free port, a temporary directory, no
persistence unless asked (`persistent=True`: an append-only file synced on every write, so a
killed server restarts with everything it acknowledged). Never the machine's own Redis on
6379, never a database we did not create."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """start() / kill() / restart() on one port, so clients can reconnect to the same URL."""

    def __init__(self, directory: Path, port: int | None = None, *,
                 persistent: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        self.directory = directory
        self.port = port or free_port()
        self.persistent = persistent
        # A free port can be taken between free_port() and the server's bind (tests run in
        # parallel, and other test runs share the machine): the first start may move to
        # another one; later starts keep the port, so that clients reconnect to the same URL.
        self.may_move = port is None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> RedisServer:
        tries = 5 if self.may_move else 1
        for attempt in range(tries):
            if attempt:
                self.port = free_port()
            if self._start_once():
                self.may_move = False
                return self
            self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _start_once(self) -> bool:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent \
            else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                # The server answering must be ours, not one that holds the port already.
                pid = self.client().info("server")["process_id"]
                return pid == self.process.pid
            except redis.ConnectionError:
                time.sleep(0.02)
            except redis.RedisError:
                return False  # someone else's server, which wants a password
        return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()
