"""systemd's notify protocol (`Type=notify`): READY, WATCHDOG, STOPPING and STATUS messages.

A datagram of `KEY=value` lines to the AF_UNIX socket named by `$NOTIFY_SOCKET`; a name
starting with `@` is in the abstract namespace (leading NUL byte). Without `$NOTIFY_SOCKET`
(not under systemd) every call does nothing. See sd_notify(3); a few lines, no dependency.
"""

from __future__ import annotations

import os
import socket


def _address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


class SystemdNotifier:
    """Sends notifications for this process; `watchdog_s` is systemd's WatchdogSec or None."""

    def __init__(self, socket_name: str | None, watchdog_s: float | None = None) -> None:
        self.socket_name = socket_name or None
        self.watchdog_s = watchdog_s
        self.ready_sent = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        watchdog_s = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(env.get("NOTIFY_SOCKET"), watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when not under systemd, the socket is gone or its queue
        is full. Never raises and never blocks: a lost notification must not stop the worker
        (a datagram socket nobody reads holds only net.unix.max_dgram_qlen, 10 by default)."""
        if self.socket_name is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(_address(self.socket_name))
                sock.sendall("\n".join(lines).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        self.ready_sent = True
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, status: str = "") -> bool:
        return self.notify("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def alive(self, status: str = "") -> bool:
        """The first call is READY=1, every later one WATCHDOG=1 (the heartbeat calls this)."""
        return self.watchdog(status) if self.ready_sent else self.ready(status)
