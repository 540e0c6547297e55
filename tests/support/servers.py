"""Real servers for the tests: memcached processes on free loopback ports.

The test command installs memcached (Debian package ``memcached``); these helpers start
it, wait until it answers, and stop or restart it (for the kill/restart fault tests).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable

__all__ = ["MemcachedProcess", "free_port", "just_stored", "ttl_as_stored"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MemcachedProcess:
    """One memcached server on ``127.0.0.1:port``, started by :meth:`start`."""

    def __init__(self, port: int | None = None, *, memory_mb: int = 64, threads: int = 2) -> None:
        binary = shutil.which("memcached") or "/usr/bin/memcached"
        self.binary = binary
        self.port = port or free_port()
        self.memory_mb = memory_mb
        #: memcached worker threads; each connection is served by one of them.
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MemcachedProcess:
        """Start the server (as root it needs ``-u``) and wait until it accepts."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-l",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "0",
                "-m",
                str(self.memory_mb),
                "-u",
                "root",
                "-t",
                str(self.threads),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memcached exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"version\r\n")
                    if s.recv(64).startswith(b"VERSION"):
                        return self
            except OSError:
                time.sleep(0.02)  # polling a process we started; no event to wait on
        raise RuntimeError(f"memcached did not start on port {self.port}")

    def stop(self) -> None:
        """Kill the server (SIGKILL, as a crash would) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Kill the server and start a fresh, empty one on the same port."""
        self.stop()
        self.start()

    def raw(self, command: bytes) -> bytes:
        """Send one raw protocol command and return what the server answers first."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(command)
            return s.recv(65536)

    def clock(self) -> int:
        """memcached's own clock (``stats`` ``time``): unix seconds, moved once a
        second."""
        reply = self.raw(b"stats\r\n")
        line = next(x for x in reply.split(b"\r\n") if x.startswith(b"STAT time "))
        return int(line.split()[2])

    def ttl(self, mkey: bytes) -> int | None:
        """memcached's remaining TTL of ``mkey`` in whole seconds (meta get): -1 =
        never, None = absent."""
        reply = self.raw(b"mg " + mkey + b" t\r\n")
        if reply.startswith(b"EN"):
            return None
        assert reply.startswith(b"HD t"), reply
        return int(reply.split()[1][1:])


def ttl_as_stored(server: MemcachedProcess, store: Callable[[], object], mkey: bytes) -> int | None:
    """Call ``store`` and return memcached's remaining TTL of ``mkey`` right after, in
    whole seconds, as it was stored: tried again (up to 5 times) while memcached's clock
    ticked in between, which would make it one less. For the checks of a rounding."""
    for _ in range(5):
        before = server.clock()
        store()
        ttl = server.ttl(mkey)
        if server.clock() == before:
            return ttl
    raise AssertionError("memcached's clock ticked during every try")


def just_stored(seconds: int) -> tuple[int, int]:
    """The remaining TTLs memcached may report for an item stored for ``seconds`` a
    moment ago: ``seconds``, or one less if its clock (which ticks once a second) moved
    in between."""
    return (seconds - 1, seconds)
