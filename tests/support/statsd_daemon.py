"""A real StatsD daemon for the tests: Etsy's ``statsd`` (npm), on free loopback ports.

The test command installs it with npm into ``.tools/statsd`` (git-ignored);
``CACHECHAIN_STATSD_JS`` may point at another ``stats.js``. :class:`StatsdDaemon` starts
it with a config of its own: UDP and management (TCP) ports on 127.0.0.1, no backend, and
a flush interval of an hour, so that nothing is reset while a test runs. Its management
interface answers ``counters``, ``timers``, ``gauges`` and ``stats`` (with
``messages.bad_lines_seen``).

The daemon prints those objects with ``util.inspect``, which is not JSON and cuts long
arrays; a two-line preload makes it print JSON instead. Nothing else is changed: the
packets are parsed and counted by the daemon's own code. Lines it rejects are logged on
its stdout, kept in :attr:`StatsdDaemon.log_path`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["StatsdDaemon", "find_statsd_js", "free_udp_port"]

_ROOT = Path(__file__).resolve().parents[2]
_PRELOAD = """\
const util = require('util');
util.inspect = function (value) { return JSON.stringify(value); };
"""


def find_statsd_js() -> Path:
    """Return the daemon's ``stats.js``; raise ``RuntimeError`` saying how to install it."""
    configured = os.environ.get("CACHECHAIN_STATSD_JS")
    candidates = [Path(configured)] if configured else []
    candidates.append(_ROOT / ".tools" / "statsd" / "node_modules" / "statsd" / "stats.js")
    for path in candidates:
        if path.is_file():
            return path
    raise RuntimeError(
        "Etsy's StatsD daemon is not installed: run bash scripts/test.sh, or "
        "npm install --prefix .tools/statsd statsd@0.9.0 (needs node and npm)"
    )


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StatsdDaemon:
    """One Etsy StatsD daemon on ``127.0.0.1``: UDP :attr:`port`, TCP :attr:`mgmt_port`."""

    def __init__(self, *, flush_interval_ms: int = 3_600_000) -> None:
        self.node = shutil.which("node") or "/usr/bin/node"
        self.stats_js = find_statsd_js()
        self.port = free_udp_port()
        self.mgmt_port = _free_tcp_port()
        self.flush_interval_ms = flush_interval_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="cachechain-statsd-"))
        #: The daemon's stdout and stderr (it logs every bad line there).
        self.log_path = self._dir / "statsd.log"

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)``: where to send metrics."""
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 15.0) -> StatsdDaemon:
        """Start the daemon and wait until both its management port and its UDP port
        answer (a probe counter sent over UDP shows up, and is deleted again)."""
        config = {
            "address": "127.0.0.1",
            "port": self.port,
            "mgmt_address": "127.0.0.1",
            "mgmt_port": self.mgmt_port,
            "flushInterval": self.flush_interval_ms,
            "backends": [],
            "automaticConfigReload": False,
        }
        config_path = self._dir / "config.js"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        preload = self._dir / "json-inspect.js"
        preload.write_text(_PRELOAD, encoding="utf-8")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.node, "-r", str(preload), str(self.stats_js), str(config_path)],
                cwd=self.stats_js.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if self.command("health").startswith("health: up"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"statsd did not start; log: {self.log_text()}")
            time.sleep(0.02)  # polling a process we started; no event to wait on
        probe = "statsd_daemon_probe"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while probe not in self.counters():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"statsd ignores UDP; log: {self.log_text()}")
                s.sendto(f"{probe}:1|c".encode(), self.address)
                time.sleep(0.02)  # as above
        self.command(f"delcounters {probe}")
        return self

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"statsd is not running; log: {self.log_text()}")

    def stop(self) -> None:
        """Stop the daemon and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_text(self) -> str:
        """What the daemon printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- the management interface ---------------------------------------------------------
    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one management command; return the answer without its ``END`` line."""
        with socket.create_connection(("127.0.0.1", self.mgmt_port), timeout=timeout) as s:
            s.sendall(line.encode("ascii") + b"\n")
            data = b""
            while not (data.endswith(b"END\n\n") or data.startswith(b"health:")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        text = data.decode("utf-8", "replace")
        return text[: -len("END\n\n")] if text.endswith("END\n\n") else text

    def _json(self, command: str) -> dict[str, Any]:
        value = json.loads(self.command(command))
        assert isinstance(value, dict)
        return value

    def counters(self) -> dict[str, float]:
        """Every counter since the start (never reset: the flush interval is an hour)."""
        return self._json("counters")

    def timers(self) -> dict[str, list[float]]:
        """Every timer's received values, in milliseconds."""
        return self._json("timers")

    def gauges(self) -> dict[str, float]:
        """Every gauge's value."""
        return self._json("gauges")

    def stats(self) -> dict[str, str]:
        """The ``stats`` answer as ``{"messages.bad_lines_seen": "0", ...}``."""
        out: dict[str, str] = {}
        for line in self.command("stats").splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def bad_lines_seen(self) -> int:
        """How many lines the daemon rejected since it started."""
        return int(self.stats()["messages.bad_lines_seen"])

    def packets_received(self) -> int:
        """How many datagrams the daemon parsed since it started."""
        return int(self.counters().get("statsd.packets_received", 0))

    def wait_for_packets(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the daemon has parsed at least ``count`` datagrams in all (UDP
        delivery on loopback is asynchronous: what was sent may still be queued)."""
        self.wait_until(lambda: self.packets_received() >= count, timeout, f"{count} packets")

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll the daemon until ``condition()`` holds; raise ``AssertionError`` naming
        ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"statsd never saw {what}; log: {self.log_text()}")
            time.sleep(0.01)  # polling an external process; no event to wait on
