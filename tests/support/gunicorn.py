"""Real gunicorn servers for the many-process tests (``tests/test_workers.py``) and the
load script (``scripts/load_workers.py``).

:class:`GunicornProcess` starts ``python -m gunicorn`` (the running interpreter's) on a
free loopback port for one of the example apps (``examples/django_app``,
``examples/flask_app``, their ``wsgi`` module), with the environment the apps read
(``CACHECHAIN_MEMCACHED``, ``CACHECHAIN_EXAMPLE_BACKEND``,
``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1``). Everything the master and its workers write
to stderr (gunicorn's error log, tracebacks, Python logging) goes to one file, read
back with :meth:`GunicornProcess.log_text` and screened with :func:`log_problems` and
:func:`log_warnings`.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.servers import free_port

__all__ = ["APPS", "GunicornProcess", "log_problems", "log_warnings"]

ROOT = Path(__file__).resolve().parents[2]

#: The example apps gunicorn can serve: their directory (gunicorn's ``--chdir``).
APPS = {
    "django": ROOT / "examples" / "django_app",
    "flask": ROOT / "examples" / "flask_app",
}

#: A gunicorn error-log line: ``[2024-01-01 00:00:00 +0000] [pid] [LEVEL] message``.
_GUNICORN_LINE = re.compile(r"^\[[^\]]+\] \[\d+\] \[(?P<level>[A-Z]+)\] ")
#: A log record of the example apps: ``[LEVEL] logger: message``.
_APP_LINE = re.compile(r"^\[(?P<level>[A-Z]+)\] [\w.]+: ")


def _supports(setting: str) -> bool:
    """Whether the installed gunicorn knows ``setting`` (an option added after 21.2)."""
    from gunicorn.config import KNOWN_SETTINGS

    return any(s.name == setting for s in KNOWN_SETTINGS)


class GunicornProcess:
    """One gunicorn master serving ``framework``'s example app on ``127.0.0.1:port``.

    ``worker_class`` is ``"sync"`` or ``"gthread"`` (``threads`` threads per worker);
    ``preload`` loads the app in the master before it forks the ``workers``;
    ``backend`` is ``"cachechain"`` or ``"stock"`` (the framework's own memcached
    backend); ``memcached`` is the ``HOST:PORT`` of the shared memcached; ``env`` adds
    to the environment the app is given.
    """

    def __init__(
        self,
        framework: str,
        memcached: str,
        *,
        backend: str = "cachechain",
        workers: int = 4,
        worker_class: str = "sync",
        threads: int = 4,
        preload: bool = False,
        env: Mapping[str, str] | None = None,
        log_dir: str | None = None,
    ) -> None:
        if framework not in APPS:
            raise ValueError(f"framework must be one of {sorted(APPS)}, got {framework!r}")
        if worker_class not in ("sync", "gthread"):
            raise ValueError(f"worker_class must be 'sync' or 'gthread', got {worker_class!r}")
        self.framework = framework
        self.memcached = memcached
        self.backend = backend
        self.workers = workers
        self.worker_class = worker_class
        self.threads = threads if worker_class == "gthread" else 1
        self.preload = preload
        self.env = dict(env or {})
        self.port = free_port()
        fd, self.log_path = tempfile.mkstemp(
            prefix=f"gunicorn-{framework}-{worker_class}-", suffix=".log", dir=log_dir
        )
        os.close(fd)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        """What runs, for reports: ``"django gthread x4 --preload (cachechain)"``."""
        kind = f"{self.worker_class} x{self.threads}" if self.threads > 1 else self.worker_class
        preload = " --preload" if self.preload else ""
        return f"{self.framework} {kind}{preload} ({self.backend})"

    def command(self) -> list[str]:
        """The gunicorn command line."""
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
            "--worker-class",
            self.worker_class,
            "--threads",
            str(self.threads),
            "--chdir",
            str(APPS[self.framework]),
            "--log-level",
            "info",
            "--timeout",
            "30",
            "--graceful-timeout",
            "5",
        ]
        if self.preload:
            cmd.append("--preload")
        if _supports("control_socket_disable"):  # gunicorn >= 24 opens one by default
            cmd.append("--no-control-socket")
        cmd.append("wsgi:application")
        return cmd

    def start(self, timeout: float = 30.0) -> GunicornProcess:
        """Start gunicorn and wait (bounded by ``timeout`` seconds) until a worker answers
        ``GET /load/pid``. Raises :class:`RuntimeError`, with the log, when it exits or
        does not answer in time."""
        env = dict(os.environ)
        env.update(
            CACHECHAIN_MEMCACHED=self.memcached,
            CACHECHAIN_EXAMPLE_BACKEND=self.backend,
            CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        )
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self._answers():
                return self
            time.sleep(0.05)  # polling a process we started; no event to wait on
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {timeout} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/load/pid")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master (SIGTERM: it stops its workers) and wait for it; SIGKILL the
        process group when it does not exit within ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def log_text(self) -> str:
        """Everything the master and its workers wrote so far."""
        return Path(self.log_path).read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def remove_log(self) -> None:
        """Delete the log file."""
        Path(self.log_path).unlink(missing_ok=True)

    def __enter__(self) -> GunicornProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _level(line: str) -> str | None:
    """The level of a gunicorn line or of an app's log record (``[LEVEL] logger: ...``,
    the format of the example apps), else None."""
    match = _GUNICORN_LINE.match(line) or _APP_LINE.match(line)
    return match["level"] if match else None


def log_problems(text: str) -> list[str]:
    """The lines of a gunicorn log that report a problem: gunicorn's own lines above
    INFO (worker timeouts, crashes, boot errors), the apps' records at ERROR and above,
    and every line in neither format (tracebacks, output of unconfigured logging)."""
    problems = []
    for line in text.splitlines():
        if not line.strip():
            continue
        level = _level(line)
        gunicorn_warning = level == "WARNING" and _GUNICORN_LINE.match(line)
        if level is None or gunicorn_warning or level in ("ERROR", "CRITICAL"):
            problems.append(line)
    return problems


def log_warnings(text: str) -> list[str]:
    """The apps' log records at WARNING (``[WARNING] cachechain: ...``): worth
    reading, not failures (a memcached call that timed out on a loaded machine)."""
    return [
        line for line in text.splitlines() if _APP_LINE.match(line) and _level(line) == "WARNING"
    ]
