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
  (a random draw would cost as much again on the hottest path). Kept values wait in a
  buffer bounded to ``max_samples`` per timer, and are sent in milliseconds with
  ``|@rate``, ``rate`` being the values sent over the events they stand for, so that
  StatsD's count of each timer is right even when values were left out (a full
  buffer, or the datagram budget below). What is left out is counted
  (:attr:`StatsdExporterStats.dropped_samples`, and the counter
  ``<prefix>.statsd_exporter.dropped_samples``) and warned about once.
- **Gauges** (queue depth and capacity, breaker state, entries) keep their latest value
  and are sent at every flush. Figures a chain polls rather than pushes (entries,
  evictions, queue depth) are read through its refresh hook just before each flush.
- **Sending happens on one daemon thread**, every ``flush_interval`` seconds, and early
  when a timer buffer is half full (at most five times an interval). The lines are
  packed by the ``statsd`` package's pipeline into datagrams of at most
  ``max_udp_size`` bytes (default 1432), counters first, then gauges, then timer
  values, and at most ``max_packets`` datagrams a second (counters and gauges are
  always sent; timer values give way, spread evenly, a rare timer keeping all of its
  own). They are sent paced, in bursts of :data:`BURST_BYTES` with a pause of
  :data:`BURST_PAUSE` between two, so that the daemon's socket buffer is not overrun
  (UDP would lose the datagrams without telling the sender). ``sendto`` is used on an
  unconnected, non-blocking UDP socket (a connected one raises
  ``ConnectionRefusedError`` once the daemon is down), to an address that the thread
  resolved once; a datagram the socket refuses is counted, warned about once, and the
  counter increases it held are sent again by the next flush. A host that does not
  resolve is counted, logged once and tried again at each flush; counters keep
  accumulating meanwhile and are sent once it resolves. No ``record_*`` call ever
  resolves a name, touches a socket or waits for the thread.
- :meth:`StatsdExporter.close` sends what is pending; so does interpreter exit. A
  forked child (gunicorn ``--preload``) starts its own thread and socket and does not
  send again what its parent had counted.

Names are StatsD's plain dotted form, sanitized to ``[A-Za-z0-9_]``::

    <prefix>.<chain>.<layer>.hits                         counter
    <prefix>.<chain>.<layer>.operation_duration.get       timer (ms)
    <prefix>.<chain>.requests.hit.<served_by>             counter
    <prefix>.<chain>.<layer>.queue_depth                  gauge

(the full table is in the README; every name is derived from cachechain's metrics
catalogue, :data:`cachechain.metrics.METRICS`). With ``tags=True`` the chain, layer and
other labels become DogStatsD tags instead: ``<prefix>.hits:3|c|#chain:web,layer:L1``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachechain import ConfigError
from cachechain.metrics import (
    LogOnce,
    MetricsCollector,
    RefreshHooks,
    forward_records,
    track_fork,
)

from ._options import DEFAULT_MAX_PACKETS, DEFAULT_PREFIX, Options, Resolver
from ._series import MAX_SERIES, SeriesTable
from ._view import ChainView
from ._wire import Tally, Transport, clean

__all__ = ["DEFAULT_PREFIX", "MAX_SERIES", "StatsdExporter", "StatsdExporterStats"]

log = logging.getLogger("cachechain.statsd")
_log_once = LogOnce(log)
_TOKENS = itertools.count()

#: At most this many flushes per interval when full timer buffers wake the thread early.
MAX_EARLY_FLUSHES = 5
#: A flush sends its datagrams in bursts of about this many bytes...
BURST_BYTES = 16 * 1024
#: ...with this pause (seconds) between two bursts, so that a receiver draining its
#: socket buffer (Linux's default is about 208 KB) keeps up.
BURST_PAUSE = 0.002


@dataclass(frozen=True)
class StatsdExporterStats:
    """What an exporter did: ``packets_sent`` datagrams holding ``lines_sent`` lines in
    ``flushes`` flushes; ``send_errors`` datagrams the socket refused (their timer and
    gauge lines are lost; their counters' increases are sent again by the next flush);
    ``dropped_samples`` timer values not sent, because a buffer was full
    (``max_samples``) or the datagram budget (``max_packets`` a second) was spent (each
    timer's count stays right: the values sent carry the ``|@rate`` of what they stand
    for); ``dropped_series`` records dropped because :data:`MAX_SERIES` was reached;
    ``record_errors`` record calls that failed inside the exporter (nothing recorded,
    nothing raised); ``resolve_failures`` failed lookups of the host; ``resolved``
    whether the address is known; ``pauses`` pauses between bursts of a flush."""

    packets_sent: int
    lines_sent: int
    flushes: int
    send_errors: int
    dropped_samples: int
    dropped_series: int
    resolve_failures: int
    resolved: bool
    record_errors: int = 0
    pauses: int = 0


_EXPORTERS: weakref.WeakSet[StatsdExporter] = weakref.WeakSet()


@forward_records(lambda self: self._default(), "the chain ``default``")
class StatsdExporter(MetricsCollector):
    """Sends cachechain's metrics to StatsD over UDP, batched, from a daemon thread.

    ``host`` and ``port``: the daemon (default ``STATSD_HOST`` or ``localhost``,
    ``STATSD_PORT`` or 8125). ``prefix`` starts every name (default ``STATSD_PREFIX`` or
    ``cache_chain``; ``""`` for none). ``tags``: DogStatsD tags for chain, layer and the
    other labels instead of dotted name parts. ``flush_interval``: seconds between
    sends. ``timer_sample_rate`` (0 to 1): the share of durations sent as timer values,
    rounded to 1/N (every N-th event of a series); 0 turns timers off, and counters are
    exact whatever it is. ``max_udp_size``: the largest datagram, bytes (default
    ``STATSD_MAXUDPSIZE`` or 1432, which suits loopback and Ethernet LANs).
    ``max_packets``: datagrams sent a second at most, on average over the flushes
    (counters and gauges are always sent; timer values beyond the budget are left out,
    counted, and the ones sent carry the ``|@rate`` that keeps each timer's count
    right). ``max_samples``:
    timer values buffered per timer between sends. ``ipv6``: resolve ``host`` to an IPv6
    address (default ``STATSD_IPV6``). ``environ`` replaces ``os.environ`` for the
    ``STATSD_*`` variables; ``resolver`` replaces ``socket.getaddrinfo`` (tests).
    ``start``: start the sending thread now (with ``False``, only :meth:`flush` and
    :meth:`close` send, from the caller's thread).

    The names, kinds and labels of the metrics are cachechain's catalogue
    (:data:`cachechain.metrics.METRICS`): a metric's StatsD name is its
    :attr:`~cachechain.metrics.Metric.statsd`, a counter is sent as ``|c``, a histogram
    as a timer (``|ms``), a gauge as ``|g``. Its ``record_*`` methods record for the
    chain ``default``; a chain records through the view :meth:`bind_chain` returns.

    Raises :class:`~cachechain.ConfigError` naming the option (or the
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
        max_packets: int = DEFAULT_MAX_PACKETS,
        max_samples: int = 5000,
        ipv6: bool | None = None,
        environ: Mapping[str, str] | None = None,
        resolver: Resolver | None = None,
        start: bool = True,
    ) -> None:
        options = Options.resolve(
            os.environ if environ is None else environ,
            host=host,
            port=port,
            prefix=prefix,
            max_udp_size=max_udp_size,
            ipv6=ipv6,
            tags=tags,
            flush_interval=flush_interval,
            timer_sample_rate=timer_sample_rate,
            max_samples=max_samples,
            max_packets=max_packets,
        )
        if resolver is not None and not callable(resolver):
            raise ConfigError(
                f"resolver must be callable like socket.getaddrinfo, got {resolver!r}"
            )
        #: The daemon's host name or address.
        self.host = options.host
        #: The daemon's UDP port.
        self.port = options.port
        #: The sanitized prefix of every name ("" for none).
        self.prefix = options.prefix
        #: The largest datagram, bytes.
        self.max_udp_size = options.max_udp_size
        #: Datagrams sent a second at most, on average (counters and gauges excepted).
        self.max_packets = options.max_packets
        self.ipv6 = options.ipv6
        self.tags = options.tags
        self.flush_interval = options.flush_interval
        #: Every N-th event of a series keeps its duration (0: timers off).
        self.sample_period = options.sample_period
        #: The share of durations sent: ``1 / sample_period`` (0.0 when timers are off).
        self.timer_sample_rate = 1 / self.sample_period if self.sample_period else 0.0
        self.max_samples = options.max_samples
        #: A buffer this full wakes the sending thread before its interval ends.
        self.wake_at = max(1, self.max_samples // 2)
        self._resolver: Resolver = resolver or socket.getaddrinfo
        self._pfx = f"{self.prefix}." if self.prefix else ""
        self._init_state()
        _EXPORTERS.add(self)
        track_fork(self)
        if start:
            self.start()

    def _init_state(self) -> None:
        self._token = next(_TOKENS)
        self._lock = threading.Lock()  # series creation
        self._flush_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._hooks = RefreshHooks(functools.partial(_hook_failed, self._token))
        self._series = table = SeriesTable(self._pfx)
        self._tally, self._timer, self._gauge = table.tally, table.timer, table.gauge
        self._views: dict[tuple[str, tuple[str, ...]], ChainView] = {}
        self._transport = Transport(self.max_udp_size)
        self._burst = max(1, BURST_BYTES // self.max_udp_size)
        # The datagram budget: max_packets a second, up to a second's worth at once (an
        # interval's, for intervals above a second).
        self._most = self.max_packets * max(1.0, self.flush_interval)
        self._tokens = self._most
        self._filled_at = time.monotonic()
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
        self._pauses = 0
        self._record_errors = Tally(())  # bumped by any thread
        self._resolve_failures = 0
        self._pid = os.getpid()

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
            self._warn("flush", "statsd exporter flush failed: %r", exc)

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
        self._series.forget()
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
            self._hooks.run()
            self._flushes += 1
            packed = self._series.pack(self._transport, self.sample_period, self._budget())
            self._tokens -= len(packed.datagrams)
            if packed.dropped:
                self._warn(
                    "samples",
                    "statsd exporter: %d timer values left out of a flush (a buffer of "
                    "max_samples=%d was full, or max_packets=%d datagrams a second were "
                    "spent); counters are exact, each timer's count is kept by |@rate, and "
                    "the values left out are counted in %sstatsd_exporter.dropped_samples",
                    packed.dropped,
                    self.max_samples,
                    self.max_packets,
                    self._pfx,
                )
            self._send_paced(packed.datagrams)
            return True

    def _budget(self) -> int:
        """Datagrams this flush may send: a budget refilled with ``max_packets`` a
        second, holding at most a second's worth (or a ``flush_interval``'s, if longer:
        a flush after a quiet spell may send that much at once; an early flush gets the
        share of the time since the last one; counters and gauges sent beyond the
        budget are taken from the next)."""
        now = time.monotonic()
        refill = (now - self._filled_at) * self.max_packets
        self._tokens = min(self._most, self._tokens + refill)
        self._filled_at = now
        return max(0, int(self._tokens))

    def _send_paced(self, datagrams: list[str]) -> None:
        """Send ``datagrams`` in order, in bursts of about :data:`BURST_BYTES` with a
        pause of :data:`BURST_PAUSE` seconds between two (on this thread: a cache call
        never waits for it)."""
        burst = self._burst
        for i, data in enumerate(datagrams):
            if i and not i % burst:
                self._pauses += 1
                time.sleep(BURST_PAUSE)
            self._send_datagram(data)

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` before each flush, so that figures a chain polls rather than
        pushes (entries, evictions, queue depth) are sent current. ``fn`` reports through
        the ``record_*`` methods; a hook that returns ``False`` is dropped (its chain is
        closed or gone), so is a bound method whose object is gone, and what one raises
        is logged once."""
        self._hooks.add(fn)

    def _resolve(self) -> bool:
        family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        try:
            info = self._resolver(self.host, self.port, family, socket.SOCK_DGRAM)
            family, _, _, _, addr = info[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        except Exception as exc:
            self._resolve_failures += 1
            self._warn(
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
        key = (self._token, "resolve")
        if not _log_once.first(key):  # it had failed, and said so: say it recovered
            log.warning("statsd exporter: %s:%s resolved to %s", self.host, self.port, addr)
        _log_once.forget(lambda k: k == key)
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
            self._series.send_errors.inc()
            carried = _carry_counts(data, self._series.carry)
            self._warn(
                "send",
                "statsd exporter: a send failed (%r); its %d counter increases are sent "
                "again by the next flush, its other lines are dropped; counted in "
                "%sstatsd_exporter.send_errors",
                exc,
                carried,
                self._pfx,
            )
            return
        self._packets += 1
        self._lines += data.count("\n") + 1

    def _warn(self, what: str, message: str, *args: Any) -> None:
        """Log ``message`` at WARNING the first time ``what`` goes wrong for this
        exporter (until it recovers), at DEBUG after."""
        _log_once((self._token, what), message, *args)

    def stats(self) -> StatsdExporterStats:
        """Return what the exporter did so far."""
        return StatsdExporterStats(
            packets_sent=self._packets,
            lines_sent=self._lines,
            flushes=self._flushes,
            send_errors=self._send_errors,
            dropped_samples=self._series.pending_drops(),
            dropped_series=self._series.dropped_series,
            resolve_failures=self._resolve_failures,
            resolved=self._addr is not None,
            record_errors=self._record_errors.value(),
            pauses=self._pauses,
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
            tags = [f"chain:{clean(chain)}"]
            if layer is not None:
                tags.append(f"layer:{clean(layer)}")
            tags += [f"{clean(k)}:{clean(v)}" for k, v in labels]
            return f"{self._pfx}{clean(metric)}|#{','.join(tags)}"
        parts = [chain] if layer is None else [chain, layer]
        parts.append(metric)
        parts += [v for _, v in labels]
        return self._pfx + ".".join(clean(p) for p in parts)

    # -- MetricsCollector ---------------------------------------------------------------
    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Return the collector of the chain ``chain`` with ``layers``: a view whose
        series are created once, here, so that a record only bumps counters."""
        key = (str(chain), tuple(str(name) for name in layers))
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = ChainView(self, *key)
            with self._lock:
                view = self._views.setdefault(key, view)
        return view

    def _default(self) -> MetricsCollector:
        return self.bind_chain("default", ())


def _carry_counts(data: str, carry: dict[str, int]) -> int:
    """Add the counter increases of the datagram ``data`` (lines ``name:n|c``, tags
    after ``|#`` kept in the key) to ``carry``; return how many lines they were."""
    found = 0
    for line in data.split("\n"):
        name, _, rest = line.partition(":")
        value, kind, tail = rest.partition("|c")
        if kind and (not tail or tail.startswith("|#")):
            with contextlib.suppress(ValueError):
                key = name + tail
                carry[key] = carry.get(key, 0) + int(value)
                found += 1
    return found


def _hook_failed(token: int, fn: Callable[[], object], exc: Exception) -> None:
    _log_once((token, "refresh"), "statsd exporter: a refresh hook raised %r", exc)


def _close_all_at_exit() -> None:
    for exporter in list(_EXPORTERS):
        if exporter._pid == os.getpid():
            with contextlib.suppress(Exception):  # never a traceback at exit
                exporter.close(timeout=0.5)


atexit.register(_close_all_at_exit)
