"""The sd_notify protocol against real AF_UNIX datagram sockets (a path and an abstract
name), the watchdog settings from the environment, and the daemon's READY / WATCHDOG /
STOPPING sequence on fakeredis with the real default model."""

from __future__ import annotations

import os
import socket
import uuid

import fakeredis
import pytest

from worker.systemd_notify import SystemdNotifier


@pytest.fixture
def listener(tmp_path):
    """A socket standing in for systemd's notify socket, at a filesystem path."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def received(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def pending(sock) -> list[list[str]]:
    """Every datagram waiting on the socket, without blocking."""
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096).decode().split("\n"))
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(5)


def test_messages_reach_a_path_socket(listener):
    path, sock = listener
    notifier = SystemdNotifier(path)
    assert notifier.ready("loaded")
    assert received(sock) == ["READY=1", "STATUS=loaded"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping("draining 2 jobs")
    assert received(sock) == ["STOPPING=1", "STATUS=draining 2 jobs"]


def test_abstract_namespace_name():
    name = f"orcd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())  # what systemd's '@name' means
    sock.settimeout(5)
    with sock:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.alive() and received(sock) == ["READY=1"]
        assert notifier.alive("ok") and received(sock) == ["WATCHDOG=1", "STATUS=ok"]


def test_without_systemd_nothing_is_sent_and_nothing_raises(tmp_path):
    assert not SystemdNotifier.from_env({}).enabled
    assert not SystemdNotifier.from_env({}).ready()
    gone = SystemdNotifier(str(tmp_path / "no-such.sock"))
    assert gone.enabled and not gone.ready()  # a vanished socket is not an error


def test_a_full_socket_drops_messages_instead_of_blocking(listener):
    path, sock = listener
    notifier = SystemdNotifier(path)
    sent = [notifier.watchdog() for _ in range(200)]  # nobody reads: the queue fills
    assert sent[0] and not all(sent)
    assert received(sock) == ["WATCHDOG=1"]


def test_watchdog_interval_is_for_this_process_only():
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_env(mine).watchdog_s == 30.0
    assert SystemdNotifier.from_env({**mine, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert SystemdNotifier.from_env({"WATCHDOG_USEC": "x"}).watchdog_s is None


def test_daemon_ready_after_first_heartbeat_then_watchdog_then_stopping(listener, monkeypatch):
    from jobs.keys import Keys
    from worker.daemon import Worker, WorkerConfig
    from worker.loaded_model import load_model

    try:
        model = load_model("smollm2-135m", kv_blocks=64, progress=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {exc}")
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = Worker(model, WorkerConfig(worker_id="w1", block_ms=5, heartbeat_s=0.01), client=r)
    worker.open()
    try:
        assert pending(sock) == []  # loaded, but no heartbeat yet: not ready
        worker.iteration()
        assert r.exists(Keys().worker("w1"))
        ready = received(sock)
        assert ready[0] == "READY=1" and ready[1].startswith("STATUS=serving smollm2-135m")
        worker._maintain(worker.heartbeat.next_at)
        assert received(sock)[0] == "WATCHDOG=1"
        worker.stop("SIGTERM")
        worker.iteration()
        assert received(sock) == ["STOPPING=1", "STATUS=draining 0 jobs"]
    finally:
        worker.close()
