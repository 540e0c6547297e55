"""Name lookups of memcached servers, bounded by the call's deadline.

``socket.getaddrinfo`` blocks for as long as the system's resolver takes (for each
name server, ``timeout`` seconds per attempt, ``attempts`` times: 5 s and 2 by
default in ``/etc/resolv.conf``), and no timeout of Python's reaches it. A server given
by name (``memcached:11211``, a Kubernetes service) would let a slow or dead resolver
hold a request far past the call's deadline each time a connection is opened. So a
:class:`~._wire.Connection` asks :meth:`Resolver.addresses`, which:

- answers a numeric host (``127.0.0.1``, ``::1``) at once, without the resolver
  (``AI_NUMERICHOST``), and remembers that it is one;
- runs any other lookup on a daemon thread and waits for it at most until the
  deadline: a resolver that hangs costs the caller the call's time, never more.
  Concurrent connects to one server share the lookup in flight;
- keeps each server's last good answer and falls back to it when a lookup fails or
  does not answer in time: a DNS outage does not take memcached down with it. With a
  last answer a connect waits for a fresh lookup half the time left at most (the rest
  is the connect's own), and not at all while an earlier lookup is still in flight
  (the resolver is hanging);
- raises ``TimeoutError`` when no answer came in time and none is known (the layer's
  :class:`~cachechain.LayerTimeoutError`), the resolver's own ``socket.gaierror`` (an
  ``OSError``: :class:`~cachechain.LayerUnavailableError`) when it failed and none is
  known.

Every lookup that connects is a fresh one when the resolver answers in time, so a
server that moves is found on the next connect, as before.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .. import _fork

__all__ = ["RESOLVER", "Address", "Resolver"]

#: What a connect needs of one address: ``(family, type, proto, canonname, sockaddr)``,
#: an item of ``socket.getaddrinfo``'s answer.
Address = tuple[Any, ...]
#: ``getaddrinfo(host, port, family, type, proto, flags)``, as :mod:`socket` has it.
Lookup = Callable[..., list[Address]]

_ARGS: Final = (socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
_UNSEEN: Final[list[Address]] = []  # a server not yet looked at (see _numeric)


class _Flight:
    """One lookup in flight: ``done`` is set once ``answer`` or ``error`` is."""

    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: list[Address] | None = None
        self.error: OSError | None = None


class Resolver:
    """The addresses of memcached servers, found within a deadline (see the module
    docstring). ``lookup`` is ``socket.getaddrinfo`` (tests pass a fake);
    ``monotonic`` the clock deadlines are read on. Thread-safe and fork-safe (a
    lookup in flight in the parent is forgotten in a child, its last answers kept)."""

    def __init__(
        self,
        lookup: Lookup = socket.getaddrinfo,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._numeric: dict[tuple[str, int], list[Address] | None] = {}
        self._known: dict[tuple[str, int], list[Address]] = {}
        self._flights: dict[tuple[str, int], _Flight] = {}
        _fork.track(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._flights = {}

    def addresses(self, host: str, port: int, deadline: float) -> list[Address]:
        """The addresses of ``host``:``port`` to try in turn, found by ``deadline``
        (:func:`time.monotonic` seconds) or taken from the last good answer. Raises
        ``TimeoutError`` or the resolver's ``OSError`` when there is neither."""
        server = (host, port)
        numeric = self._numeric.get(server, _UNSEEN)
        if numeric is _UNSEEN:
            numeric = self._numeric[server] = self._as_numeric(host, port)
        if numeric is not None:
            return numeric
        with self._lock:
            last = self._known.get(server)
            flight = self._flights.get(server)
            if flight is not None and last is not None:
                return last  # the resolver is still busy with an earlier lookup
            started = flight is None
            if flight is None:
                flight = self._flights[server] = _Flight()
        if started:
            self._start(server, flight)
        left = deadline - self._monotonic()
        if flight.done.wait(max(0.0, left if last is None else left / 2)):
            if flight.answer is not None:
                return flight.answer
            if last is None:
                raise flight.error or OSError(f"the name lookup of {host!r} failed")
        if last is not None:
            return last
        raise TimeoutError(f"the name lookup of {host!r} did not answer in time")

    def _as_numeric(self, host: str, port: int) -> list[Address] | None:
        """The addresses of a numeric ``host``, or None for a name."""
        try:
            return self._lookup(host, port, *_ARGS, socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            return None

    def _start(self, server: tuple[str, int], flight: _Flight) -> None:
        """Run ``flight``'s lookup on a daemon thread, or here when no thread can start
        (at interpreter shutdown: a last ``close()`` draining its writes)."""
        thread = threading.Thread(
            target=self._resolve,
            args=(server, flight),
            name=f"cachechain-resolve-{server[0]}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:
            self._resolve(server, flight)

    def _resolve(self, server: tuple[str, int], flight: _Flight) -> None:
        """A lookup's thread: ask the resolver, keep a good answer, end the flight."""
        try:
            answer = self._lookup(*server, *_ARGS)
            if not answer:
                raise socket.gaierror(f"no address found for {server[0]!r}")
            flight.answer = answer
        except OSError as exc:
            flight.error = exc
        except Exception as exc:  # the resolver's own failure (UnicodeError...)
            flight.error = OSError(f"the name lookup of {server[0]!r} failed: {exc!r}")
        finally:
            with self._lock:
                if flight.answer is not None:
                    self._known[server] = flight.answer
                if self._flights.get(server) is flight:
                    del self._flights[server]
            flight.done.set()


#: The resolver every connection of the process uses.
RESOLVER: Final = Resolver()
