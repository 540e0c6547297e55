"""Fixtures of the plugin's tests: a real StatsD daemon, and a plain UDP receiver.

The daemon helper lives in the cachechain repository (``tests/support/statsd_daemon.py``,
shared with cachechain's own tests); these tests run from a checkout of it, with the
plugin installed the way users install it (``pip install ./plugins/cachechain-statsd``).
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HELPER = Path(__file__).resolve().parents[3] / "tests" / "support" / "statsd_daemon.py"


def _load_daemon_module() -> Any:
    if not _HELPER.is_file():
        raise RuntimeError(
            f"{_HELPER} not found: run these tests from a checkout of the cachechain repository"
        )
    spec = importlib.util.spec_from_file_location("cachechain_test_statsd_daemon", _HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


statsd_daemon = _load_daemon_module()


@pytest.fixture(scope="session")
def daemon() -> Iterator[Any]:
    """Etsy's StatsD daemon on free loopback ports, for the whole session."""
    server = statsd_daemon.StatsdDaemon().start()
    yield server
    server.stop()


class Receiver:
    """A UDP socket on 127.0.0.1 that collects the datagrams sent to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5.0)
        self.port: int = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []

    def receive(self, count: int = 1) -> list[bytes]:
        """Block until ``count`` more datagrams arrived (5 s at most each); return them."""
        got = [self.sock.recv(65536) for _ in range(count)]
        self.datagrams += got
        return got

    def drain(self) -> list[str]:
        """Return the lines of every datagram waiting now (does not block)."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    self.datagrams.append(self.sock.recv(65536))
                except BlockingIOError:
                    break
        finally:
            self.sock.settimeout(5.0)
        return self.lines()

    def lines(self) -> list[str]:
        """Every line received so far."""
        return [line for d in self.datagrams for line in d.decode("ascii").split("\n") if line]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    """A plain UDP receiver on a free loopback port."""
    r = Receiver()
    yield r
    r.close()
