"""StatsdExporter: cachechain's metrics to a StatsD daemon, batched and off the request path.

What a cache call costs, and what it never does:

- **Counters are aggregated in memory, exactly.** A ``record_*`` call bumps a lock-free
  counter (``itertools.count``, whose ``next()`` is atomic under the GIL; a lock on
  free-threaded builds) and returns. Every flush sends each counter's increase since the
  last flush as one ``|c`` line, so StatsD's counts equal what the chain did.
- **Timers are sampled, not aggregated.** StatsD computes percentiles, means and upper
  bounds from the raw values it receives, so the values must reach it as they are; a
  client-side aggregate (a mean, a histogram) would lose exactly what StatsD is for.
  Every N-th event of a series keeps its duration (N = ``round(1 / timer_sample_rate)``,
  default 10), which costs nothing beyond the counter bump that the event makes anyway
  (a random draw would cost as much again on the hottest path). Kept values are sent in
  milliseconds with ``|@<1/N>``, from which StatsD scales the timer's count back up.
  They wait in a buffer bounded to ``max_samples`` per timer; beyond that they are
  dropped and counted (:attr:`StatsdExporterStats.dropped_samples`, and the counter
  ``<prefix>.statsd_exporter.dropped_samples``).
- **Gauges** (queue depth and capacity, breaker state, entries) keep their latest value
  and are sent at every flush. Figures a chain polls rather than pushes (entries,
  evictions, queue depth) are read through its refresh hook just before each flush.
- **Sending happens on one daemon thread**, every ``flush_interval`` seconds, and early
  when a timer buffer is half full (at most five times an interval). The lines are
  packed by the ``statsd`` package's pipeline into datagrams of at most
  ``max_udp_size`` bytes and sent with ``sendto`` on an unconnected, non-blocking UDP
  socket (a connected one raises ``ConnectionRefusedError`` once the daemon is down),
  to an address that the thread resolved once. A host that does not resolve is
  counted, logged once and tried again at each flush; counters keep accumulating
  meanwhile and are sent once it resolves. No ``record_*`` call ever resolves a name,
  touches a socket or waits for the thread.
- :meth:`StatsdExporter.close` sends what is pending; so does interpreter exit. A
  forked child (gunicorn ``--preload``) starts its own thread and socket and does not
  send again what its parent had counted.

Names are StatsD's plain dotted form, sanitized to ``[A-Za-z0-9_]``::

    <prefix>.<chain>.<layer>.hits                         counter
    <prefix>.<chain>.<layer>.operation_duration.get       timer (ms)
    <prefix>.<chain>.requests.hit.<served_by>             counter
    <prefix>.<chain>.<layer>.queue_depth                  gauge

(the full table is in the README). With ``tags=True`` the chain, layer and other labels
become DogStatsD tags instead: ``<prefix>.hits:3|c|#chain:web,layer:L1``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import os
import re
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachechain import ConfigError
from cachechain.metrics import MetricsCollector
from statsd.client.base import StatsClientBase
from statsd.client.udp import Pipeline

__all__ = ["DEFAULT_PREFIX", "StatsdExporter", "StatsdExporterStats"]

log = logging.getLogger("cachechain.statsd")

#: The prefix of every metric name unless ``prefix`` or ``STATSD_PREFIX`` says otherwise.
DEFAULT_PREFIX = "cache_chain"
#: At most this many flushes per interval when full timer buffers wake the thread early.
MAX_EARLY_FLUSHES = 5
#: Most distinct series (counters, timers or gauges) one exporter keeps; more are dropped.
MAX_SERIES = 10_000

_GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
_ADD_LOCK = threading.Lock()
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_STATES = {0: "closed", 1: "open", 2: "half_open"}

Resolver = Callable[[str, int, int, int], Sequence[tuple[Any, ...]]]


def _clean(part: object) -> str:
    """A name component or tag value in ``[A-Za-z0-9_]`` (anything else becomes ``_``)."""
    return _UNSAFE.sub("_", str(part)) or "_"


class _Tally:
    """An exact counter that many threads increment without taking a lock.

    ``inc()`` adds one and returns the count before it: ``next()`` of an
    ``itertools.count`` runs entirely in C while holding the GIL, so no increment is
    lost (free-threaded builds take a lock instead). ``add(n)`` (rare) takes a lock.
    ``targets`` are the stat keys this tally feeds; ``sent`` is its value at the last
    flush.
    """

    __slots__ = ("_extra", "_it", "inc", "sent", "targets")

    def __init__(self, targets: tuple[str, ...]) -> None:
        self._it = itertools.count()
        self._extra = 0
        self.inc: Callable[[], int] = self._it.__next__ if _GIL else self._locked_inc
        self.sent = 0
        self.targets = targets

    def _locked_inc(self) -> int:
        with _ADD_LOCK:
            return next(self._it)

    def add(self, n: int) -> None:
        """Add ``n`` (may be called from any thread)."""
        with _ADD_LOCK:
            self._extra += n

    def value(self) -> int:
        """The total so far."""
        # repr(count(41)) == "count(41)": the only public view of a count's state.
        return int(repr(self._it)[6:-1]) + self._extra


class _Samples:
    """Kept timer values (seconds) of one or more timers, waiting for the next flush.

    Threads ``append`` to ``values`` (atomic under the GIL); :meth:`drain` removes the
    ones present when it starts, so a value appended meanwhile waits for the next flush.
    """

    __slots__ = ("targets", "values")

    def __init__(self, targets: tuple[str, ...]) -> None:
        self.values: list[float] = []
        self.targets = targets

    def drain(self) -> list[float]:
        values = self.values
        n = len(values)
        taken = values[:n]
        del values[:n]
        return taken


@dataclass(frozen=True)
class StatsdExporterStats:
    """What an exporter did: ``packets_sent`` datagrams holding ``lines_sent`` lines in
    ``flushes`` flushes; ``send_errors`` datagrams the socket refused (dropped);
    ``dropped_samples`` timer values dropped because a buffer was full;
    ``dropped_series`` records dropped because :data:`MAX_SERIES` was reached;
    ``resolve_failures`` failed lookups of the host; ``resolved`` whether the address is
    known."""

    packets_sent: int
    lines_sent: int
    flushes: int
    send_errors: int
    dropped_samples: int
    dropped_series: int
    resolve_failures: int
    resolved: bool


class _Transport(StatsClientBase):  # type: ignore[misc]
    """The ``statsd`` client the pipeline hands its datagrams to: it passes them to the
    exporter, which sends them on its own socket."""

    def __init__(self, exporter: StatsdExporter, max_udp_size: int) -> None:
        self._prefix = None
        self._maxudpsize = max_udp_size
        self._exporter = exporter

    def _send(self, data: str) -> None:
        self._exporter._send_datagram(data)

    def pipeline(self) -> _Batch:
        return _Batch(self)

    def close(self) -> None:
        """Nothing to release: the exporter owns the socket."""


class _Batch(Pipeline):  # type: ignore[misc]
    """statsd's UDP pipeline (it packs lines into datagrams of at most ``max_udp_size``
    bytes), formatting lines for values that were sampled already and may carry tags.

    A stat is ``name`` or ``name|#tags``; ``rate`` < 1 is written as ``|@rate`` without
    sampling again (the exporter sampled when the value was recorded)."""

    def _prepare(self, stat: str, value: str, rate: float) -> str:
        name, _, tags = stat.partition("|#")
        line = f"{name}:{value}"
        if rate < 1:
            line += f"|@{_rate_text(rate)}"
        if tags:
            line += f"|#{tags}"
        return line


def _rate_text(rate: float) -> str:
    return format(rate, ".6f").rstrip("0").rstrip(".")


# -- option checks ------------------------------------------------------------------------


def _check_host(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{field} must be a host name or address without spaces, got {value!r}")
    return value.strip()


def _check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{field} must be an int in {low}-{high}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field} must be an int in {low}-{high}, got {value!r}")
    return value


def _check_prefix(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{field} must be a str, got {value!r}")
    parts = [p for p in value.strip().split(".") if p]
    return ".".join(_clean(p) for p in parts)


def _check_bool(value: Any, field: str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{field} must be true or false, got {value!r}")


def _check_seconds(value: Any, field: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 3600
    ):
        raise ConfigError(f"{field} must be a number of seconds in (0, 3600], got {value!r}")
    return float(value)


# -- the exporter -------------------------------------------------------------------------

_EXPORTERS: weakref.WeakSet[StatsdExporter] = weakref.WeakSet()


class StatsdExporter(MetricsCollector):
    """Sends cachechain's metrics to StatsD over UDP, batched, from a daemon thread.

    ``host`` and ``port``: the daemon (default ``STATSD_HOST`` or ``localhost``,
    ``STATSD_PORT`` or 8125). ``prefix`` starts every name (default ``STATSD_PREFIX`` or
    ``cache_chain``; ``""`` for none). ``tags``: DogStatsD tags for chain, layer and the
    other labels instead of dotted name parts. ``flush_interval``: seconds between
    sends. ``timer_sample_rate`` (0 to 1): the share of durations sent as timer values,
    rounded to 1/N (every N-th event of a series); 0 turns timers off, and counters are
    exact whatever it is. ``max_udp_size``: the
    largest datagram, bytes (default ``STATSD_MAXUDPSIZE`` or 512). ``max_samples``:
    timer values buffered per timer between sends. ``ipv6``: resolve ``host`` to an IPv6
    address (default ``STATSD_IPV6``). ``environ`` replaces ``os.environ`` for the
    ``STATSD_*`` variables; ``resolver`` replaces ``socket.getaddrinfo`` (tests).
    ``start``: start the sending thread now (with ``False``, only :meth:`flush` and
    :meth:`close` send, from the caller's thread).

    Raises :class:`~cachechain.errors.ConfigError` naming the option (or the
    environment variable) for a bad value. Never raises from a ``record_*`` method.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        prefix: str | None = None,
        *,
        tags: bool = False,
        flush_interval: float = 1.0,
        timer_sample_rate: float = 0.1,
        max_udp_size: int | None = None,
        max_samples: int = 5000,
        ipv6: bool | None = None,
        environ: Mapping[str, str] | None = None,
        resolver: Resolver | None = None,
        start: bool = True,
    ) -> None:
        env = os.environ if environ is None else environ
        if host is None:
            host = _check_host(env.get("STATSD_HOST", "localhost"), "STATSD_HOST")
        #: The daemon's host name or address.
        self.host = _check_host(host, "host")
        if port is None:
            port = _check_int(env.get("STATSD_PORT", "8125"), "STATSD_PORT", 1, 65535)
        #: The daemon's UDP port.
        self.port = _check_int(port, "port", 1, 65535)
        if prefix is None:
            prefix = _check_prefix(env.get("STATSD_PREFIX", DEFAULT_PREFIX), "STATSD_PREFIX")
        #: The sanitized prefix of every name ("" for none).
        self.prefix = _check_prefix(prefix, "prefix")
        if max_udp_size is None:
            max_udp_size = _check_int(
                env.get("STATSD_MAXUDPSIZE", "512"), "STATSD_MAXUDPSIZE", 64, 65_000
            )
        self.max_udp_size = _check_int(max_udp_size, "max_udp_size", 64, 65_000)
        if ipv6 is None:
            ipv6 = _check_bool(env.get("STATSD_IPV6", "0"), "STATSD_IPV6")
        self.ipv6 = _check_bool(ipv6, "ipv6")
        self.tags = _check_bool(tags, "tags")
        self.flush_interval = _check_seconds(flush_interval, "flush_interval")
        rate = timer_sample_rate
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not (rate == 0 or 0.000001 <= rate <= 1)
        ):
            raise ConfigError(
                f"timer_sample_rate must be 0 (no timers) or a number in [0.000001, 1], "
                f"got {rate!r}"
            )
        #: Every N-th event of a series keeps its duration (0: timers off).
        self.sample_period = round(1 / rate) if rate else 0
        #: The share of durations sent: ``1 / sample_period`` (0.0 when timers are off).
        self.timer_sample_rate = 1 / self.sample_period if self.sample_period else 0.0
        self.max_samples = _check_int(max_samples, "max_samples", 1, 10_000_000)
        if resolver is not None and not callable(resolver):
            raise ConfigError(
                f"resolver must be callable like socket.getaddrinfo, got {resolver!r}"
            )
        self._resolver: Resolver = resolver or socket.getaddrinfo
        self._pfx = f"{self.prefix}." if self.prefix else ""
        #: A buffer this full wakes the sending thread before its interval ends.
        self.wake_at = max(1, self.max_samples // 2)

        self._lock = threading.Lock()  # series creation
        self._flush_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._tallies: dict[Any, _Tally] = {}
        self._samples: dict[Any, _Samples] = {}
        self._gauges: dict[str, float] = {}
        self._hooks: list[Callable[[], object]] = []
        self._discard_tally = _Tally(())
        self._discard_samples = _Samples(())
        self._dropped = _Tally((f"{self._pfx}statsd_exporter.dropped_samples",))
        self._dropped_series = 0
        self._views: dict[tuple[str, tuple[str, ...]], _ChainView] = {}
        self._transport = _Transport(self, self.max_udp_size)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop = False
        self._closed = False
        self._finished = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._addr: Any = None
        self._packets = 0
        self._lines = 0
        self._flushes = 0
        self._send_errors = 0
        self._resolve_failures = 0
        self._logged: set[str] = set()
        self._pid = os.getpid()
        _EXPORTERS.add(self)
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"<StatsdExporter {self.host}:{self.port} prefix={self.prefix!r}>"

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the sending thread (a daemon thread); does nothing if it runs already
        or the exporter is closed."""
        with self._close_lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._stop = False
            thread = threading.Thread(
                target=self._run, name=f"cachechain-statsd-{self.host}:{self.port}", daemon=True
            )
            self._thread = thread
            thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self, timeout: float = 1.0) -> None:
        """Send what is pending and stop the thread, waiting at most ``timeout``
        seconds for it. Idempotent; later records are kept but never sent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._stop = True
        self._stopping.set()
        self._wake.set()
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return  # still resolving or sending: it exits by itself, socket and all
        else:
            self._flush_quietly()
        self._close_socket()

    def _close_socket(self) -> None:
        with self._flush_lock:
            self._finished = True  # the final flush is done: nothing is sent any more
            sock, self._sock, self._addr = self._sock, None, None
        if sock is not None:
            sock.close()

    def _run(self) -> None:
        while True:
            early = self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop
            self._flush_quietly()
            if stopping:
                if self._closed:
                    self._close_socket()
                return
            if early:
                # Woken because a timer buffer is half full: flush by size, but at most
                # MAX_EARLY_FLUSHES times an interval, so that a flood of records cannot
                # turn this thread into a busy loop competing for the GIL.
                self._stopping.wait(self.flush_interval / MAX_EARLY_FLUSHES)

    def _wake_thread(self) -> None:
        """Ask the sending thread to flush now (a timer buffer is filling up)."""
        self._wake.set()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # pragma: no cover - flush handles what it can foresee
            self._log_once("flush", "statsd exporter flush failed: %r", exc)

    def _after_fork(self) -> None:
        """In a forked child: new locks, thread and socket; the parent's counts are the
        parent's to send."""
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pid = os.getpid()
        if self._sock is not None:
            self._sock.close()  # this process's copy; the parent's socket stays open
        self._sock, self._addr = None, None
        for tally in [*self._tallies.values(), self._dropped]:
            tally.sent = tally.value()
        for samples in self._samples.values():
            samples.drain()
        self._thread = None
        if not self._closed:
            self.start()

    # -- sending ------------------------------------------------------------------------
    def flush(self) -> bool:
        """Send everything recorded since the last flush, now, from this thread.

        Returns False (and sends nothing, keeping the counts for later) when the host
        does not resolve, or after :meth:`close` has sent its last batch. Never raises
        for a network problem: failed sends are counted in :meth:`stats`.
        """
        with self._flush_lock:
            if self._finished or (self._addr is None and not self._resolve()):
                return False
            self._refresh()
            self._flushes += 1
            with self._lock:
                tallies = [*self._tallies.values(), self._dropped]
                samples = list(self._samples.values())
                gauges = dict(self._gauges)
            batch = self._transport.pipeline()
            totals: dict[str, int] = {}
            for tally in tallies:
                value = tally.value()
                delta = value - tally.sent
                if delta:
                    tally.sent = value
                    for stat in tally.targets:
                        totals[stat] = totals.get(stat, 0) + delta
            for stat, delta in totals.items():
                batch.incr(stat, delta)
            for stat, gauge in gauges.items():
                batch.gauge(stat, gauge)
            rate = self.timer_sample_rate
            for kept in samples:
                values = kept.drain()
                for stat in kept.targets:
                    for seconds in values:
                        batch.timing(stat, max(0.0, seconds) * 1000.0, rate)
            batch.send()
            return True

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` before each flush, so that figures a chain polls rather than
        pushes (entries, evictions, queue depth) are sent current. ``fn`` reports through
        the ``record_*`` methods; a hook that returns ``False`` is dropped (its chain is
        closed or gone), and what one raises is logged once."""
        with self._lock:
            self._hooks.append(fn)

    def _refresh(self) -> None:
        with self._lock:
            hooks = list(self._hooks)
        dead = []
        for fn in hooks:
            try:
                if fn() is False:
                    dead.append(fn)
            except Exception as exc:
                self._log_once("refresh", "statsd exporter: a refresh hook raised %r", exc)
        if dead:
            with self._lock:
                self._hooks = [h for h in self._hooks if h not in dead]

    def _resolve(self) -> bool:
        family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        try:
            info = self._resolver(self.host, self.port, family, socket.SOCK_DGRAM)
            family, _, _, _, addr = info[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        except Exception as exc:
            self._resolve_failures += 1
            self._log_once(
                "resolve",
                "statsd exporter: cannot resolve %s:%s (%r); metrics are kept and the "
                "lookup is tried again every %.3g s. Cache operations are unaffected",
                self.host,
                self.port,
                exc,
                self.flush_interval,
            )
            return False
        self._sock, self._addr = sock, addr
        if "resolve" in self._logged:
            log.warning("statsd exporter: %s:%s resolved to %s", self.host, self.port, addr)
            self._logged.discard("resolve")
        return True

    def _send_datagram(self, data: str) -> None:
        sock = self._sock
        if sock is None:  # pragma: no cover - closed while a flush was packing
            self._send_errors += 1
            return
        try:
            sock.sendto(data.encode("ascii", "replace"), self._addr)
        except OSError as exc:
            self._send_errors += 1
            self._log_once("send", "statsd exporter: a send failed (%r); dropped, counted", exc)
            return
        self._packets += 1
        self._lines += data.count("\n") + 1

    def _log_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.warning(message, *args)

    def stats(self) -> StatsdExporterStats:
        """Return what the exporter did so far."""
        return StatsdExporterStats(
            packets_sent=self._packets,
            lines_sent=self._lines,
            flushes=self._flushes,
            send_errors=self._send_errors,
            dropped_samples=self._dropped.value(),
            dropped_series=self._dropped_series,
            resolve_failures=self._resolve_failures,
            resolved=self._addr is not None,
        )

    # -- series -------------------------------------------------------------------------
    def stat(
        self,
        metric: str,
        chain: str,
        layer: str | None = None,
        labels: Sequence[tuple[str, str]] = (),
    ) -> str:
        """The stat key of a series: ``prefix.chain[.layer].metric[.label values]``, or
        with tags ``prefix.metric|#chain:..,layer:..,label:value``."""
        if self.tags:
            tags = [f"chain:{_clean(chain)}"]
            if layer is not None:
                tags.append(f"layer:{_clean(layer)}")
            tags += [f"{_clean(k)}:{_clean(v)}" for k, v in labels]
            return f"{self._pfx}{_clean(metric)}|#{','.join(tags)}"
        parts = [chain] if layer is None else [chain, layer]
        parts.append(metric)
        parts += [v for _, v in labels]
        return self._pfx + ".".join(_clean(p) for p in parts)

    def _tally(self, *targets: str, key: Any = None) -> _Tally:
        key = targets[0] if key is None else key
        tally = self._tallies.get(key)
        if tally is None:
            with self._lock:
                tally = self._tallies.get(key)
                if tally is None:
                    if len(self._tallies) + len(self._samples) >= MAX_SERIES:
                        self._dropped_series += 1
                        return self._discard_tally
                    tally = self._tallies[key] = _Tally(targets)
        return tally

    def _timer(self, *targets: str, key: Any = None) -> _Samples:
        key = targets[0] if key is None else key
        kept = self._samples.get(key)
        if kept is None:
            with self._lock:
                kept = self._samples.get(key)
                if kept is None:
                    if len(self._tallies) + len(self._samples) >= MAX_SERIES:
                        self._dropped_series += 1
                        return self._discard_samples
                    kept = self._samples[key] = _Samples(targets)
        return kept

    def _gauge(self, stat: str, value: float) -> None:
        gauges = self._gauges
        if stat not in gauges and len(gauges) >= MAX_SERIES:
            self._dropped_series += 1
            return
        gauges[stat] = value

    # -- MetricsCollector ---------------------------------------------------------------
    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Return the collector of the chain ``chain`` with ``layers``: a view whose
        series are created once, here, so that a record only bumps counters."""
        key = (str(chain), tuple(str(name) for name in layers))
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = _ChainView(self, *key)
            with self._lock:
                view = self._views.setdefault(key, view)
        return view

    def _default(self) -> _ChainView:
        view = self.bind_chain("default", ())
        assert isinstance(view, _ChainView)
        return view

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """See :meth:`MetricsCollector.record_get`; recorded for the chain ``default``."""
        self._default().record_get(layer, hit, duration)

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        """See :meth:`MetricsCollector.record_set`; recorded for the chain ``default``."""
        self._default().record_set(layer, success, duration)

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        """See :meth:`MetricsCollector.record_delete`; for the chain ``default``."""
        self._default().record_delete(layer, success, duration)

    def record_circuit_state(self, layer: str, state: int) -> None:
        """See :meth:`MetricsCollector.record_circuit_state`; for the chain ``default``."""
        self._default().record_circuit_state(layer, state)

    def record_queue_depth(self, layer: str, depth: int) -> None:
        """See :meth:`MetricsCollector.record_queue_depth`; for the chain ``default``."""
        self._default().record_queue_depth(layer, depth)

    def record_write_dropped(self, layer: str, reason: str = "queue_full") -> None:
        """See :meth:`MetricsCollector.record_write_dropped`; for the chain ``default``."""
        self._default().record_write_dropped(layer, reason)

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        """See :meth:`MetricsCollector.record_async_write`; for the chain ``default``."""
        self._default().record_async_write(layer, success, duration)

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        """See :meth:`MetricsCollector.record_chain_get`; for the chain ``default``."""
        self._default().record_chain_get(hit, layer_index, total_duration)

    def record_first_layer_hit(self, layer: str, duration: float) -> None:
        """See :meth:`MetricsCollector.record_first_layer_hit`; for the chain ``default``."""
        self._default().record_first_layer_hit(layer, duration)

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        """See :meth:`MetricsCollector.record_error`; for the chain ``default``."""
        self._default().record_error(layer, operation, error_type)

    def record_circuit_rejected(self, layer: str) -> None:
        """See :meth:`MetricsCollector.record_circuit_rejected`; for the chain ``default``."""
        self._default().record_circuit_rejected(layer)

    def record_queue_capacity(self, layer: str, capacity: int) -> None:
        """See :meth:`MetricsCollector.record_queue_capacity`; for the chain ``default``."""
        self._default().record_queue_capacity(layer, capacity)

    def record_load(self, success: bool, duration: float) -> None:
        """See :meth:`MetricsCollector.record_load`; for the chain ``default``."""
        self._default().record_load(success, duration)

    def record_singleflight_shared(self) -> None:
        """See :meth:`MetricsCollector.record_singleflight_shared`; chain ``default``."""
        self._default().record_singleflight_shared()

    def record_evictions(self, layer: str, count: int) -> None:
        """See :meth:`MetricsCollector.record_evictions`; for the chain ``default``."""
        self._default().record_evictions(layer, count)

    def record_entries(self, layer: str, entries: int) -> None:
        """See :meth:`MetricsCollector.record_entries`; for the chain ``default``."""
        self._default().record_entries(layer, entries)


class _LayerSeries:
    """The pre-created series of one layer of one chain."""

    __slots__ = (
        "async_fail",
        "async_ok",
        "async_samples",
        "capacity",
        "del_fail",
        "del_ok",
        "del_samples",
        "depth",
        "entries",
        "get_samples",
        "hit",
        "miss",
        "name",
        "rejected",
        "set_fail",
        "set_ok",
        "set_samples",
        "state",
        "state_stat",
    )

    def __init__(self, x: StatsdExporter, chain: str, layer: str) -> None:
        def counter(metric: str, *labels: tuple[str, str]) -> Callable[[], int]:
            return x._tally(x.stat(metric, chain, layer, labels)).inc

        def timer(operation: str) -> list[float]:
            stat = x.stat("operation_duration", chain, layer, [("operation", operation)])
            return x._timer(stat).values

        self.name = layer
        self.hit = counter("hits")
        self.miss = counter("misses")
        self.get_samples = timer("get")
        self.set_ok = counter("operations", ("operation", "set"), ("result", "success"))
        self.set_fail = counter("operations", ("operation", "set"), ("result", "failure"))
        self.set_samples = timer("set")
        self.del_ok = counter("operations", ("operation", "delete"), ("result", "success"))
        self.del_fail = counter("operations", ("operation", "delete"), ("result", "failure"))
        self.del_samples = timer("delete")
        self.async_ok = counter("async_writes", ("result", "success"))
        self.async_fail = counter("async_writes", ("result", "failure"))
        self.async_samples = x._timer(x.stat("async_write_duration", chain, layer)).values
        self.rejected = counter("circuit_rejected")
        self.depth = x.stat("queue_depth", chain, layer)
        self.capacity = x.stat("queue_capacity", chain, layer)
        self.entries = x.stat("entries", chain, layer)
        self.state_stat = x.stat("circuit_state", chain, layer)
        self.state: int | None = None


class _ChainView(MetricsCollector):
    """The collector one chain reports to: every series it will need exists already,
    so a record bumps a counter and, for every N-th event of a series, keeps the
    duration, and that is all."""

    record_first_layer_hit: Callable[[str, float], None]  # type: ignore[assignment]

    def __init__(self, exporter: StatsdExporter, chain: str, layers: tuple[str, ...]) -> None:
        x = self._x = exporter
        self.chain = chain
        self.layer_names = layers
        self._period = exporter.sample_period
        self._cap = exporter.max_samples
        self._wake_at = exporter.wake_at
        self._wake = exporter._wake_thread
        self._drop = exporter._dropped.inc
        self._series_lock = threading.Lock()
        self._per_layer: dict[str, _LayerSeries] = {}
        for name in layers:
            self._per_layer[name] = _LayerSeries(x, chain, name)
        # Per logical get: served by layer i, or by none.
        self._served = [
            x._tally(x.stat("requests", chain, None, [("result", "hit"), ("served_by", n)])).inc
            for n in layers
        ]
        self._served_none = x._tally(
            x.stat("requests", chain, None, [("result", "miss"), ("served_by", "none")])
        ).inc
        self._req_hit = x._timer(x.stat("request_duration", chain, None, [("result", "hit")]))
        self._req_miss = x._timer(x.stat("request_duration", chain, None, [("result", "miss")]))
        self.record_first_layer_hit = self._first_layer_hit_recorder()

    def _first_layer_hit_recorder(self) -> Callable[[str, float], None]:
        """Build the chain's hottest call as a closure: no attribute lookups, one
        counter bump that stands for both the layer's hit and the logical get, and one
        kept duration (for both timers) every ``sample_period`` hits."""
        x, chain, layers = self._x, self.chain, self.layer_names
        slow_get, slow_chain_get = self.record_get, self.record_chain_get

        def fallback(layer: str, duration: float) -> None:
            slow_get(layer, True, duration)
            slow_chain_get(True, 0, duration)

        if not layers:
            return fallback
        first = layers[0]
        hits = x.stat("hits", chain, first)
        served = x.stat("requests", chain, None, [("result", "hit"), ("served_by", first)])
        inc = x._tally(hits, served, key=("first", chain, first)).inc
        get = x.stat("operation_duration", chain, first, [("operation", "get")])
        values = x._timer(get, self._req_hit.targets[0], key=("first", chain, first)).values
        period, cap, wake_at, wake, drop = (
            self._period,
            self._cap,
            self._wake_at,
            self._wake,
            self._drop,
        )
        if not period:

            def count_only(layer: str, duration: float) -> None:
                if layer == first:
                    inc()
                else:
                    fallback(layer, duration)

            return count_only

        append = values.append

        def record_first_layer_hit(layer: str, duration: float) -> None:
            if layer == first:
                if not inc() % period:
                    n = len(values)
                    if n < cap:
                        append(duration)
                        if n == wake_at:
                            wake()
                    else:
                        drop()
            else:
                fallback(layer, duration)

        return record_first_layer_hit

    def __repr__(self) -> str:
        return f"<StatsdExporter view of chain {self.chain!r} {list(self.layer_names)}>"

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Have the exporter call ``fn()`` before each flush (see
        :meth:`StatsdExporter.add_refresh_hook`)."""
        self._x.add_refresh_hook(fn)

    def _layer(self, layer: str) -> _LayerSeries:
        series = self._per_layer.get(layer)
        if series is None:
            with self._series_lock:
                series = self._per_layer.get(layer)
                if series is None:
                    series = _LayerSeries(self._x, self.chain, layer)
                    self._per_layer = {**self._per_layer, layer: series}
        return series

    def _keep(self, count: int, values: list[float], seconds: float) -> None:
        """Keep ``seconds`` if ``count`` (the series' event number) is a multiple of
        the sample period and the buffer has room; count it as dropped otherwise."""
        period = self._period
        if period and not count % period:
            n = len(values)
            if n < self._cap:
                values.append(seconds)
                if n == self._wake_at:
                    self._wake()
            else:
                self._drop()

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """Count a hit or a miss of ``layer`` and maybe keep its duration."""
        series = self._per_layer.get(layer) or self._layer(layer)
        count = series.hit() if hit else series.miss()
        self._keep(count, series.get_samples, duration)

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        """Count one logical get by the layer that served it (or none)."""
        if hit:
            if 0 <= layer_index < len(self._served):
                count = self._served[layer_index]()
            else:
                x = self._x
                stat = x.stat(
                    "requests",
                    self.chain,
                    None,
                    [("result", "hit"), ("served_by", str(layer_index))],
                )
                count = x._tally(stat).inc()
            self._keep(count, self._req_hit.values, total_duration)
        else:
            self._keep(self._served_none(), self._req_miss.values, total_duration)

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        """Count a synchronous set and maybe keep its duration."""
        series = self._per_layer.get(layer) or self._layer(layer)
        count = (series.set_ok if success else series.set_fail)()
        self._keep(count, series.set_samples, duration)

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        """Count a synchronous delete and maybe keep its duration."""
        series = self._per_layer.get(layer) or self._layer(layer)
        count = (series.del_ok if success else series.del_fail)()
        self._keep(count, series.del_samples, duration)

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        """Count a write of the async writer and maybe keep its duration."""
        series = self._per_layer.get(layer) or self._layer(layer)
        count = (series.async_ok if success else series.async_fail)()
        self._keep(count, series.async_samples, duration)

    def record_circuit_state(self, layer: str, state: int) -> None:
        """Set the breaker-state gauge; count a transition when the state changed."""
        series = self._per_layer.get(layer) or self._layer(layer)
        self._x._gauge(series.state_stat, state)
        previous, series.state = series.state, state
        if previous is not None and previous != state:
            to = _STATES.get(state, str(state))
            x = self._x
            x._tally(x.stat("circuit_transitions", self.chain, layer, [("to", to)])).inc()

    def record_queue_depth(self, layer: str, depth: int) -> None:
        """Set the queue-depth gauge."""
        series = self._per_layer.get(layer) or self._layer(layer)
        self._x._gauge(series.depth, depth)

    def record_queue_capacity(self, layer: str, capacity: int) -> None:
        """Set the queue-capacity gauge."""
        series = self._per_layer.get(layer) or self._layer(layer)
        self._x._gauge(series.capacity, capacity)

    def record_entries(self, layer: str, entries: int) -> None:
        """Set the entries gauge."""
        series = self._per_layer.get(layer) or self._layer(layer)
        self._x._gauge(series.entries, entries)

    def record_write_dropped(self, layer: str, reason: str = "queue_full") -> None:
        """Count a dropped write by reason."""
        x = self._x
        x._tally(x.stat("writes_dropped", self.chain, layer, [("reason", reason)])).inc()

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        """Count a failed call by operation and error type."""
        x = self._x
        stat = x.stat(
            "errors", self.chain, layer, [("operation", operation), ("error_type", error_type)]
        )
        x._tally(stat).inc()

    def record_circuit_rejected(self, layer: str) -> None:
        """Count a call refused by an open breaker."""
        series = self._per_layer.get(layer) or self._layer(layer)
        series.rejected()

    def record_load(self, success: bool, duration: float) -> None:
        """Count a loader call and maybe keep its duration."""
        x = self._x
        result = "success" if success else "failure"
        count = x._tally(x.stat("loads", self.chain, None, [("result", result)])).inc()
        self._keep(count, x._timer(x.stat("load_duration", self.chain)).values, duration)

    def record_singleflight_shared(self) -> None:
        """Count a caller that joined a load in flight."""
        x = self._x
        x._tally(x.stat("singleflight_shared", self.chain)).inc()

    def record_evictions(self, layer: str, count: int) -> None:
        """Add ``count`` evictions of an in-process layer."""
        if count > 0:
            x = self._x
            x._tally(x.stat("evictions", self.chain, layer)).add(int(count))


def _close_all_at_exit() -> None:
    for exporter in list(_EXPORTERS):
        if exporter._pid == os.getpid():
            with contextlib.suppress(Exception):  # never a traceback at exit
                exporter.close(timeout=0.5)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    global _ADD_LOCK
    _ADD_LOCK = threading.Lock()  # the sending thread may have held it (evictions)
    for exporter in list(_EXPORTERS):
        exporter._after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):  # pragma: no branch - absent only on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
