"""Drive the Django and Flask example apps under gunicorn (many workers, one memcached)
and check what an app relies on across workers (issue 10, point 5).

Usage (from the repository root; needs memcached, gunicorn, Django, Flask-Caching)::

    python scripts/load_workers.py                         # every framework x worker class
    python scripts/load_workers.py --backend all           # also the stock backends: the table
    python scripts/load_workers.py --framework django --worker-class gthread --preload
    python scripts/load_workers.py --url http://127.0.0.1:8000 --framework django

For each run it starts a fresh memcached (``--memcached HOST:PORT`` to use yours) and
gunicorn with ``--workers`` workers (``sync``, or ``gthread`` with ``--threads``
threads), serving the app's ``wsgi`` module with its test endpoints on
(``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1``) and the backend chosen by ``--backend``
(``cachechain``: an in-process L1 over memcached; ``stock``: Django's
``PyMemcacheCache``, Flask-Caching's ``MemcachedCache``). ``--url`` drives a server you
started instead (its log is not read). Every request opens a new connection, so
gunicorn shares them out among its workers; every response names the worker's pid.

The checks, each bounded in time:

1. ``lock``: ``add(k, 1, 10)`` from 16 concurrent requests for each of 25 keys: exactly
   one winner per key.
2. ``counter``: ``add(k, 0)``, then 400 ``incr`` from 16 concurrent clients: the counts
   returned are 1..400 once each, and every worker then reads 400 within the bound.
3. ``set``, ``delete``, ``clear`` (``--rounds`` times each): a key every worker has read
   (so holds in its in-process layer) is changed through one worker; every worker must
   read the change within the bound (``--bound``, default 0.1 s). The lag of a worker
   is measured from the moment the change was acknowledged to the end of its first
   fresh reply (an upper bound; the stock backends' lag is this method's resolution).
   A stale reply to a request sent after the bound is a failure.
4. ``sessions`` (Django: ``SESSION_ENGINE = "django.contrib.sessions.backends.cache"``):
   log in, 40 cart updates one after another (each reply must show the whole cart so
   far), the session keeps the 40 items and every worker reads them; log out, then the
   old cookie is logged out on every worker within the bound.
5. ``errors``: no 5xx and no failed request during the run, and nothing in gunicorn's
   log but its INFO lines and the apps' WARNING records (counted and shown: a
   memcached call that timed out on a loaded machine is one); a traceback, an ERROR, a
   worker timeout or crash fails.

It prints each run's results and, per framework and worker class, the table of the
issue (pattern | stock backend | cachechain); it exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.gunicorn import GunicornProcess, log_problems, log_warnings  # noqa: E402
from tests.support.servers import MemcachedProcess  # noqa: E402

#: Seconds within which every worker must see a change (cachechain's default bound).
BOUND = 0.1
#: Seconds a convergence (every worker seeing a value) may take before it fails.
CONVERGE_TIMEOUT = 1.5
#: Seconds any single HTTP request may take.
REQUEST_TIMEOUT = 10.0

# -- HTTP ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP exchange: ``status`` (0 when no HTTP answer came), the JSON ``body``,
    when it was sent and answered (``time.monotonic()`` seconds) and the session
    cookie the server set, if any."""

    status: int
    body: dict[str, Any]
    started: float
    ended: float
    cookie: str | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the worker that served it."""
        pid = self.body.get("pid")
        return pid if isinstance(pid, int) else None


class Client:
    """HTTP/1.1 to one server, a new connection per request. Every 5xx, failed request
    or answer that is not JSON is kept in :attr:`failures`."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self.failures: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()

    def call(self, method: str, endpoint: str, cookie: str | None = None, **params: Any) -> Reply:
        """``method`` ``/load/<endpoint>?params`` (values JSON-encoded when ``value``);
        ``cookie`` is the ``sessionid`` to send."""
        if "value" in params:
            params["value"] = json.dumps(params["value"])
        query = urllib.parse.urlencode(params)
        target = f"/load/{endpoint}" + (f"?{query}" if query else "")
        headers = {"Connection": "close"}
        if cookie is not None:
            headers["Cookie"] = f"sessionid={cookie}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        started = time.monotonic()
        try:
            conn.request(method, target, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            ended = time.monotonic()
            set_cookie = response.headers.get_all("Set-Cookie") or []
        except OSError as exc:
            return self._failed(f"{method} {target}: {exc!r}", started)
        finally:
            conn.close()
        with self._lock:
            self.requests += 1
        if response.status >= 500:
            return self._failed(f"{method} {target}: HTTP {response.status}", started)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._failed(f"{method} {target}: not JSON: {raw[:200]!r}", started)
        return Reply(response.status, body, started, ended, _session_cookie(set_cookie))

    def _failed(self, what: str, started: float) -> Reply:
        with self._lock:
            self.failures.append(what)
        return Reply(0, {}, started, time.monotonic())


def _session_cookie(headers: Iterable[str]) -> str | None:
    for header in headers:
        name, _, rest = header.partition("=")
        if name.strip() == "sessionid":
            return rest.split(";", 1)[0]
    return None


def in_threads(n: int, work: Callable[[int], None], timeout: float = 60.0) -> None:
    """Run ``work(i)`` for ``i`` in ``range(n)`` in ``n`` threads; re-raise the first
    exception; raise :class:`TimeoutError` when one is still running after ``timeout``."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"load threads still running after {timeout} s")
    if errors:
        raise errors[0]


def discover_workers(client: Client, expected: int, timeout: float = 10.0) -> set[int]:
    """The pids of the server's workers: ``GET /load/pid`` from concurrent clients until
    ``expected`` distinct pids answered, or ``timeout`` seconds passed."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout

    def poll(_: int) -> None:
        while len(pids) < expected and time.monotonic() < deadline:
            pid = client.call("GET", "pid").pid
            if pid is not None:
                pids.add(pid)

    in_threads(2 * expected, poll, timeout + REQUEST_TIMEOUT)
    return pids


# -- convergence: every worker sees a change ---------------------------------------------


@dataclass
class Convergence:
    """What every worker read after a change acknowledged at ``t0``.

    ``lags``: per worker, seconds from ``t0`` to the end of its first fresh reply;
    ``late``: (pid, seconds after ``t0``) of stale replies to requests sent after
    ``t0 + bound``; ``unseen``: workers with no fresh reply; ``first``: per worker, the
    first value it read.
    """

    lags: dict[int, float]
    late: list[tuple[int, float]]
    unseen: set[int]
    first: dict[int, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every worker saw the change and none served the old state past the bound."""
        return not self.late and not self.unseen

    def describe(self) -> str:
        """What went wrong, in one line ('' when :attr:`ok`)."""
        out = []
        if self.unseen:
            out.append(f"{len(self.unseen)} worker(s) never saw it")
        if self.late:
            worst = max(after for _, after in self.late)
            pids = len({pid for pid, _ in self.late})
            out.append(
                f"{len(self.late)} stale replies from {pids} worker(s) to requests sent "
                f"past the bound (up to {worst * 1000:.0f} ms after)"
            )
        return "; ".join(out)


def evaluate(
    replies: Sequence[tuple[Reply, bool]],
    workers: Iterable[int],
    t0: float,
    bound: float,
    read: Callable[[Reply], Any] = lambda r: None,
) -> Convergence:
    """Judge ``replies`` (each with whether it showed the change) to requests sent after
    a change acknowledged at ``t0``: see :class:`Convergence`."""
    lags: dict[int, float] = {}
    late: list[tuple[int, float]] = []
    first: dict[int, Any] = {}
    for reply, fresh in sorted(replies, key=lambda rf: rf[0].started):
        pid = reply.pid
        if pid is None:
            continue
        first.setdefault(pid, read(reply))
        if fresh:
            lags[pid] = min(lags.get(pid, math.inf), reply.ended - t0)
        elif reply.started > t0 + bound:
            late.append((pid, reply.started - t0))
    unseen = set(workers) - set(lags)
    return Convergence(lags, late, unseen, first)


def converge(
    client: Client,
    request: Callable[[], Reply],
    fresh: Callable[[Reply], bool],
    workers: set[int],
    t0: float,
    bound: float,
    *,
    settle: bool = True,
    timeout: float = CONVERGE_TIMEOUT,
    read: Callable[[Reply], Any] = lambda r: None,
) -> Convergence:
    """Send ``request()`` from concurrent clients until every worker gave a fresh reply
    and, with ``settle``, until twice the bound passed (so a worker that goes back to
    the old state is seen), or ``timeout`` seconds after ``t0``; judge with
    :func:`evaluate`."""
    replies: list[tuple[Reply, bool]] = []
    seen: set[int] = set()
    lock = threading.Lock()
    until = t0 + 2 * bound if settle else t0
    deadline = t0 + timeout

    def poll(_: int) -> None:
        while True:
            now = time.monotonic()
            if now > deadline or (now > until and seen >= workers):
                return
            reply = request()
            ok = fresh(reply)
            with lock:
                replies.append((reply, ok))
                if ok and reply.pid is not None:
                    seen.add(reply.pid)

    in_threads(min(2 * len(workers), 8), poll, timeout + REQUEST_TIMEOUT)
    return evaluate(replies, workers, t0, bound, read)


# -- the checks ------------------------------------------------------------------------


@dataclass
class Check:
    """One check's outcome: ``cell`` is its entry in the table, ``details`` what failed,
    ``lags`` the invalidation lags it measured (seconds)."""

    name: str
    ok: bool
    cell: str
    details: list[str] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p`` percentile (0 < p <= 1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def lag_text(lags: Sequence[float]) -> str:
    """``"lag p50 12 ms, p99 41 ms, max 43 ms (n=20)"``."""
    if not lags:
        return "no lag measured"
    p50, p99, top = (percentile(lags, p) * 1000 for p in (0.5, 0.99, 1.0))
    return f"lag p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {top:.0f} ms (n={len(lags)})"


class Run:
    """The checks against one server: ``client`` to it, its ``workers`` (pids)."""

    def __init__(self, client: Client, workers: set[int], bound: float = BOUND) -> None:
        self.client = client
        self.workers = workers
        self.bound = bound
        self.tag = uuid.uuid4().hex[:8]

    def key(self, name: str) -> str:
        """A key of this run (runs do not see each other's keys)."""
        return f"lw-{self.tag}-{name}"

    def get(self, key: str) -> Callable[[], Reply]:
        """A request reading ``key``."""
        return lambda: self.client.call("GET", "get", key=key)

    def lock(self, keys: int = 25, concurrency: int = 16) -> Check:
        """Check 1: one ``add`` winner per key among ``concurrency`` concurrent requests."""
        names = [self.key(f"lock-{i}") for i in range(keys)]
        winners = dict.fromkeys(names, 0)
        pids: set[int] = set()
        barrier = threading.Barrier(concurrency, timeout=REQUEST_TIMEOUT)
        lock = threading.Lock()

        def contend(_: int) -> None:
            for name in names:
                barrier.wait()
                reply = self.client.call("POST", "add", key=name, value=1, timeout=10)
                with lock:
                    winners[name] += reply.body.get("result") is True
                    pids.update([reply.pid] if reply.pid else [])

        in_threads(concurrency, contend)
        single = sum(1 for n in winners.values() if n == 1)
        total = sum(winners.values())
        ok = single == keys
        cell = f"1 winner on {single}/{keys} keys" + ("" if ok else f" ({total} winners)")
        details = [] if ok else [f"winners per key: {sorted(winners.values())}"]
        return Check("lock", ok, cell + f"; {len(pids)} workers served", details)

    def counter(self, total: int = 400, concurrency: int = 16) -> Check:
        """Check 2: ``add(k, 0)`` then ``total`` increments: 1..total once each, and every
        worker reads ``total`` within the bound."""
        key = self.key("counter")
        created = self.client.call("POST", "add", key=key, value=0, timeout=300)
        counts: list[Any] = []
        lock = threading.Lock()

        def count(i: int) -> None:
            for _ in range(total // concurrency + (i < total % concurrency)):
                result = self.client.call("POST", "incr", key=key).body.get("result")
                with lock:
                    counts.append(result)

        in_threads(concurrency, count)
        t0 = time.monotonic()
        ints = sorted(c for c in counts if isinstance(c, int))
        exact = ints == list(range(1, total + 1))
        top = max(ints, default=None)
        # Lost or repeated counts are failures already; the workers must still agree on
        # the last count made.
        seen = converge(
            self.client,
            self.get(key),
            lambda r: r.body.get("value") == (total if exact else top),
            self.workers,
            t0,
            self.bound,
            read=lambda r: r.body.get("value"),
        )
        reads = ", ".join(str(v) for v in sorted(seen.first.values(), key=str))
        cell = f"{top}" + ("" if exact else f" (of {total})") + f"; workers read {reads}"
        details = []
        if created.body.get("result") is not True:
            details.append(f"add(k, 0) returned {created.body.get('result')!r}")
        if not exact:
            lost = len(counts) - len(ints)
            dup = len(ints) - len(set(ints))
            details.append(
                f"{len(counts)} increments: {lost} failed, {dup} counts returned twice, "
                f"highest count {top}"
            )
        if not seen.ok:
            details.append(f"reading the last count: {seen.describe()}")
        ok = not details
        return Check("counter", ok, cell, details, list(seen.lags.values()))

    def prime(self, key: str, value: Any) -> Convergence:
        """Set ``key`` to ``value`` and wait until every worker read it (so every
        worker's in-process layer holds it)."""
        done = self.client.call("POST", "set", key=key, value=value, timeout=300)
        return converge(
            self.client,
            self.get(key),
            lambda r: r.body.get("value") == value,
            self.workers,
            done.ended,
            self.bound,
            settle=False,
        )

    def change(self, op: str, rounds: int) -> Check:
        """Check 3: ``op`` (``set``, ``delete`` or ``clear``) of a key every worker holds,
        through one worker, is seen by every worker within the bound, ``rounds`` times
        (stopping at the first failed round)."""
        lags: list[float] = []
        details: list[str] = []
        for i in range(rounds):
            key = self.key(f"{op}-{i}")
            primed = self.prime(key, "old")
            if not primed.ok:
                details.append(f"round {i}: priming: {primed.describe()}")
                break
            if op == "set":
                done = self.client.call("POST", "set", key=key, value="new", timeout=300)
                expected = "new"
            else:
                params = {} if op == "clear" else {"key": key}
                done = self.client.call("POST", op, **params)
                expected = None

            def fresh(reply: Reply, expected: Any = expected) -> bool:
                return reply.status == 200 and reply.body.get("value") == expected

            seen = converge(
                self.client,
                self.get(key),
                fresh,
                self.workers,
                done.ended,
                self.bound,
                read=lambda r: r.body.get("value"),
            )
            lags.extend(seen.lags.values())
            if op == "clear" and done.body.get("result") is False:
                details.append(f"round {i}: clear() returned False")
            if not seen.ok:
                stale = sorted(v for v in seen.first.values() if v != expected)
                details.append(f"round {i}: {seen.describe()} (first reads {stale})")
                break
        ok = not details
        cell = (
            f"seen by every worker, {lag_text(lags)}"
            if ok
            else f"FAILED: {details[0]}; {lag_text(lags)}"
        )
        return Check(op, ok, cell, details, lags)

    def sessions(self, updates: int = 40, pace: float = 0.0) -> Check:
        """Check 4 (Django): a cache-backed session survives login, ``updates`` cart
        updates across workers (one after another, ``pace`` seconds apart) and logout;
        the old cookie is then logged out on every worker within the bound."""
        login = self.client.call("POST", "login", user="alice")
        cookie = login.cookie
        if cookie is None:
            return Check("sessions", False, "FAILED: no session cookie", [f"login: {login}"])
        wrong: list[str] = []
        pids: list[int | None] = []
        reply = login
        for i in range(updates):
            if pace:
                time.sleep(pace)  # a user's pause between clicks, not a synchronisation
            reply = self.client.call("POST", "cart", cookie, item=str(i))
            pids.append(reply.pid)
            cookie = reply.cookie or cookie
            expected = [str(j) for j in range(i + 1)]
            if reply.body.get("cart") != expected:
                wrong.append(f"update {i} on {reply.pid}: cart {reply.body.get('cart')}")
        kept = reply.body.get("cart") or []  # what the session holds after the last update
        whole = converge(
            self.client,
            lambda: self.client.call("GET", "whoami", cookie),
            lambda r: r.body.get("cart") == kept,
            self.workers,
            reply.ended,
            self.bound,
        )
        logout = self.client.call("POST", "logout", cookie)
        gone = converge(
            self.client,
            lambda: self.client.call("GET", "whoami", cookie),
            lambda r: r.status == 200 and r.body.get("user") is None,
            self.workers,
            logout.ended,
            self.bound,
        )
        switches = sum(1 for a, b in itertools.pairwise(pids) if a != b)
        details = wrong[:5]
        if len(kept) != updates:
            details.append(f"the session kept {len(kept)} of the {updates} items")
        if not whole.ok:
            details.append(f"the cart after the last update: {whole.describe()}")
        if not gone.ok:
            details.append(f"replayed cookie after logout: {gone.describe()}")
        right = updates - len(wrong)
        cell = (
            f"{right}/{updates} cart updates right ({len(set(pids))} workers, "
            f"{switches} switches); "
            + ("logged out everywhere" if gone.ok else "replayed cookie still logged in")
            + f", {lag_text(list(gone.lags.values()))}"
        )
        return Check("sessions", not details, cell, details, list(gone.lags.values()))

    def errors(self, log: str | None) -> Check:
        """Check 5: no failed request in the run, and nothing in the log but INFO lines
        and the apps' warnings (listed, not failures)."""
        details = list(self.client.failures[:10])
        problems = log_problems(log) if log is not None else []
        details.extend(f"log: {line}" for line in problems[:10])
        warnings = log_warnings(log) if log is not None else []
        failures = len(self.client.failures)
        cell = f"{failures} failed of {self.client.requests} requests, " + (
            "log not read"
            if log is None
            else f"{len(problems)} errors and {len(warnings)} warnings logged"
        )
        check = Check("errors", not details, cell, details)
        check.details.extend(f"warning (not a failure): {line}" for line in warnings[:5])
        return check


#: The checks, in the order they run (``errors`` always runs, last).
CHECKS = ("lock", "counter", "set", "delete", "clear", "sessions")


@dataclass(frozen=True)
class Setup:
    """What to serve and how to drive it.

    ``framework`` (``django``, ``flask``), ``backend`` (``cachechain``, ``stock``),
    gunicorn's ``worker_class`` (``sync``, ``gthread``), ``preload``, ``workers`` and
    ``threads`` per gthread worker; ``rounds`` of each set/delete/clear check;
    ``bound``, seconds; ``session_cache`` (``default``, or ``shared``: Django's sessions
    in an alias without the in-process layer); ``session_pace``, seconds between two
    cart updates; ``memcached_timeout``, seconds per memcached call of cachechain's
    layers (the example's 0.1); ``only``, the checks to run (all when empty).
    """

    framework: str
    backend: str = "cachechain"
    worker_class: str = "sync"
    preload: bool = False
    workers: int = 4
    threads: int = 4
    rounds: int = 5
    bound: float = BOUND
    session_cache: str = "shared"
    session_pace: float = 0.0
    memcached_timeout: float = 0.1
    only: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        """``"django gthread --preload"``, and what differs from the example's defaults."""
        preload = " --preload" if self.preload else ""
        variant = []
        if self.session_cache == "shared":
            variant.append("sessions on a memcached-only alias")
        if self.session_pace:
            variant.append(f"{self.session_pace * 1000:.0f} ms between cart updates")
        if self.memcached_timeout != 0.1:
            variant.append(f"memcached timeout {self.memcached_timeout} s")
        return f"{self.framework} {self.worker_class}{preload}" + "".join(f", {v}" for v in variant)

    def env(self) -> dict[str, str]:
        """The example app's environment for this setup."""
        return {
            "CACHECHAIN_EXAMPLE_SESSION_CACHE": self.session_cache,
            "CACHECHAIN_EXAMPLE_MEMCACHED_TIMEOUT": str(self.memcached_timeout),
        }


def run_checks(url: str, setup: Setup, log: Callable[[], str] | None = None) -> list[Check]:
    """The checks of ``setup`` against the server at ``url``; ``log`` returns the
    server's log so far, for the last check (``errors``)."""
    client = Client(url)
    pids = discover_workers(client, setup.workers)
    run = Run(client, pids, setup.bound)
    checks = []
    if len(pids) < setup.workers:
        checks.append(Check("workers", False, f"only {len(pids)}/{setup.workers} answered"))
    else:
        wanted = [
            c for c in (setup.only or CHECKS) if c != "sessions" or setup.framework == "django"
        ]
        for name in wanted:
            if name in ("set", "delete", "clear"):
                checks.append(run.change(name, setup.rounds))
            elif name == "sessions":
                checks.append(run.sessions(pace=setup.session_pace))
            else:
                checks.append(getattr(run, name)())
    checks.append(run.errors(log() if log else None))
    return checks


@dataclass
class Outcome:
    """The checks of one setup."""

    setup: Setup
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(c.ok for c in self.checks)


def serve_and_check(setup: Setup, memcached: str | None = None) -> Outcome:
    """Start memcached (unless ``memcached``, ``HOST:PORT``, is given) and gunicorn as
    ``setup`` says, run its checks, stop them. The log is read right after the checks,
    before gunicorn is stopped."""
    server = None if memcached else MemcachedProcess().start()
    address = memcached or server.address  # type: ignore[union-attr]
    gunicorn = GunicornProcess(
        setup.framework,
        address,
        backend=setup.backend,
        workers=setup.workers,
        worker_class=setup.worker_class,
        threads=setup.threads,
        preload=setup.preload,
        env=setup.env(),
    )
    try:
        gunicorn.start()
        checks = run_checks(gunicorn.url, setup, gunicorn.log_text)
    except RuntimeError:  # gunicorn did not start
        problems = log_problems(gunicorn.log_text())
        checks = [Check("workers", False, "gunicorn did not start", problems[-8:])]
    finally:
        gunicorn.stop()
        gunicorn.remove_log()
        if server is not None:
            server.stop()
    return Outcome(setup, checks)


ROWS = {
    "lock": "`add(k, 1, 10)` as a lock, 16 concurrent requests x 25 keys",
    "counter": "`add(k, 0)` then 400 `incr` across workers",
    "set": "set in one worker, read in the others",
    "delete": "delete in one worker, read in the others",
    "clear": "`cache.clear()` in one worker, read in the others",
    "sessions": "cache-backed sessions: login, 40 cart updates, logout, replayed cookie",
    "errors": "nothing raises (no 5xx, clean worker logs)",
    "workers": "workers answering",
}


def table(outcomes: Sequence[Outcome]) -> str:
    """The issue's table (pattern | stock backend | cachechain) for each framework,
    worker class and ``--preload`` among ``outcomes``."""
    groups: dict[str, dict[str, Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.setup.title, {})[o.setup.backend] = o
    out = []
    for title, by_backend in groups.items():
        backends = sorted(by_backend, key=lambda b: (b != "stock", b != "cachechain", b))
        out += [f"\n### gunicorn: {title}\n", "| pattern | " + " | ".join(backends) + " |"]
        out.append("|---" * (len(backends) + 1) + "|")
        names = [n for n in ROWS if any(n in _by_name(by_backend[b]) for b in backends)]
        for name in names:
            cells = []
            for b in backends:
                check = _by_name(by_backend[b]).get(name)
                cells.append("n/a" if check is None else _mark(check))
            out.append(f"| {ROWS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def lag_summary(outcomes: Sequence[Outcome]) -> str:
    """Per backend, the invalidation lag of every set/delete/clear sample of
    ``outcomes`` (see :func:`lag_text`)."""
    lags: dict[str, list[float]] = {}
    for o in outcomes:
        samples = lags.setdefault(o.setup.backend, [])
        samples.extend(
            lag for c in o.checks if c.name in ("set", "delete", "clear") for lag in c.lags
        )
    return "\n".join(f"set/delete/clear, {b}: {lag_text(v)}" for b, v in lags.items())


def _by_name(outcome: Outcome) -> dict[str, Check]:
    return {c.name: c for c in outcome.checks}


def _mark(check: Check) -> str:
    return ("" if check.ok else "**FAIL** ") + check.cell.replace("|", "/")


def report(outcome: Outcome) -> str:
    """One run's checks, one per line, with what failed."""
    lines = [f"== {outcome.setup.title} ({outcome.setup.backend})"]
    for c in outcome.checks:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:9} {c.cell}")
        lines.extend(f"         - {d}" for d in c.details)
    return "\n".join(lines)


def _choices(value: str, every: Sequence[str]) -> list[str]:
    return list(every) if value == "all" else [value]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, print the results and the table; 0 when every
    check passed, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["django", "flask", "all"], default="all")
    parser.add_argument("--worker-class", choices=["sync", "gthread", "all"], default="all")
    parser.add_argument("--backend", choices=["cachechain", "stock", "all"], default="cachechain")
    parser.add_argument("--preload", action="store_true", help="gunicorn --preload")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4, help="threads per gthread worker")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of set/delete/clear")
    parser.add_argument("--bound", type=float, default=BOUND, help="seconds (default 0.1)")
    parser.add_argument("--memcached", help="HOST:PORT of a running memcached (default: start one)")
    parser.add_argument(
        "--session-cache",
        choices=["default", "shared"],
        default="shared",
        help="Django sessions in an alias without the in-process layer (default, as "
        "recommended), or in the default alias with L1",
    )
    parser.add_argument(
        "--session-pace", type=float, default=0.0, help="seconds between two cart updates"
    )
    parser.add_argument(
        "--memcached-timeout",
        type=float,
        default=0.1,
        help="seconds per memcached call of cachechain's layers (the example's 0.1)",
    )
    parser.add_argument("--only", help=f"comma-separated checks among {', '.join(CHECKS)}")
    parser.add_argument("--url", help="drive a running server instead (one --framework)")
    args = parser.parse_args(argv)
    only = tuple(c.strip() for c in (args.only or "").split(",") if c.strip())
    if set(only) - set(CHECKS):
        parser.error(f"--only: unknown checks {sorted(set(only) - set(CHECKS))}")
    if args.url and args.framework == "all":
        parser.error("--url needs --framework django or flask")
    setups = [
        Setup(
            framework,
            backend=backend,
            worker_class=worker_class,
            preload=args.preload,
            workers=args.workers,
            threads=args.threads,
            rounds=args.rounds,
            bound=args.bound,
            session_cache=args.session_cache,
            session_pace=args.session_pace,
            memcached_timeout=args.memcached_timeout,
            only=only,
        )
        for framework in _choices(args.framework, ("django", "flask"))
        for worker_class in (
            [f"at {args.url}"] if args.url else _choices(args.worker_class, ("sync", "gthread"))
        )
        for backend in (
            ["running server"] if args.url else _choices(args.backend, ("stock", "cachechain"))
        )
    ]
    outcomes = []
    for setup in setups:
        if args.url:
            outcomes.append(Outcome(setup, run_checks(args.url, setup)))
        else:
            outcomes.append(serve_and_check(setup, args.memcached))
        print(report(outcomes[-1]), flush=True)
    print(table(outcomes))
    print("\n" + lag_summary(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
