"""Writes of unknown fate: a write that timed out after it was sent keeps its key held
until memcached has answered it.

Why. memcached runs the commands of one connection in order, but nothing orders two
connections. When a write times out, its bytes may still be on their way (held by the
network, or by a server that was paused): dropping the connection does not stop them.
If the next write of the same key went out on another connection, memcached could run
the abandoned one after it, and an acknowledged ``delete`` would be undone by an older
``set`` (seen on loopback: a proxy that held one segment 0.6 s, CPU load, a paused
memcached that resumed). So:

- :class:`Fates` (one per pool) counts the keys of the writes in doubt. Before a write
  is sent, :meth:`Fates.wait` waits until none of its keys is held, at most until the
  write's own deadline, then raises :class:`~cachechain.WriteInDoubtError`: the write
  is refused, never sent, and the caller learns it failed (the chain repairs the key
  once it is released).
- The connection of the write in doubt is not closed but handed to the process's
  :class:`Reaper` thread. It sends what the command had left to send, then
  ``version``, and reads until memcached's ``VERSION`` line: by then memcached has run
  the abandoned command (or never will, when the server closes the connection or the
  connection fails). Only then is the connection closed and its keys released.
- A ``set`` in doubt is also retracted: the reaper sends ``delete`` of its keys right
  behind it on the same connection, so memcached runs the late set, then its delete.
  Its caller was told it failed, and another process's write of the key, which no
  hold here can order, is undone only until the delete has run: at once when the two
  were held up together, up to about one timeout when the set was only slow (the
  delete leaves at the timeout; see docs/design.md, "Writes in doubt"). An ``add`` or a
  ``cas`` is retracted only once its reply says it stored (one that did not store left
  another client's value, a lock, which a delete would remove): one round trip later.
- A connection that gets no answer for :data:`LIMIT` seconds (a server stopped for that
  long) is closed and its keys released with a warning: the server may still run that
  write when it resumes, and the warning says so. Until then the connection keeps its
  place in the pool, so a server that stalls many writes makes later calls wait for a
  connection (``PoolExhaustedError``) instead of opening more.

Reads are never held: a read in doubt changes nothing. What this cannot order: another
process's writes, which never wait for this one's; the retraction bounds what a late
set of this process can do to them (see ``docs/design.md``, "Writes in doubt").
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, Final

from .. import _fork
from .._errors import WriteInDoubtError
from .._logonce import LogOnce
from ._wire import MAX_LINE, Connection

__all__ = ["LIMIT", "Fates", "Reaper", "reaper"]

log = logging.getLogger("cachechain.memcached")
_log_once = LogOnce(log)

#: Seconds a connection in doubt waits for memcached's answer before it is closed and
#: its keys released anyway.
LIMIT: Final = 60.0
#: Sent after the abandoned command: its answer comes once every earlier command ran.
SENTINEL: Final = b"version\r\n"
_ANSWER: Final = b"VERSION "
_IN: Final = select.POLLIN | select.POLLERR | select.POLLHUP if hasattr(select, "poll") else 0


class Fates:
    """The keys (memcached keys, bytes) of one pool's writes in doubt. Thread-safe; a
    forked child's pool starts a new one (it has none of the parent's connections)."""

    __slots__ = ("_cond", "held")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        #: Held key -> how many writes in doubt carry it. Read without the lock on the
        #: write path: empty in the common case.
        self.held: dict[bytes, int] = {}

    def wait(self, keys: Collection[bytes], deadline: float, layer: str) -> None:
        """Return once none of ``keys`` is held; raise
        :class:`~cachechain.WriteInDoubtError` for layer ``layer`` if one still is at
        ``deadline`` (:func:`time.monotonic` seconds)."""
        held = self.held
        if not held:
            return
        with self._cond:
            while True:
                busy = next((key for key in keys if key in held), None)
                if busy is None:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteInDoubtError(
                        f"an earlier write of {busy[:80]!r} timed out and memcached has "
                        "not answered it yet: this write was not sent",
                        layer=layer,
                    )
                self._cond.wait(left)

    def hold(self, keys: Collection[bytes]) -> None:
        """Hold ``keys`` for one more write in doubt."""
        with self._cond:
            held = self.held
            for key in keys:
                held[key] = held.get(key, 0) + 1

    def release(self, keys: Collection[bytes]) -> None:
        """Release ``keys`` of one write whose fate is now known; wake the waiters."""
        with self._cond:
            held = self.held
            for key in keys:
                count = held.get(key, 0) - 1
                if count > 0:
                    held[key] = count
                else:
                    held.pop(key, None)
            self._cond.notify_all()


class _Entry:
    """One connection in doubt: what is left to send, what was read, since when."""

    __slots__ = ("answers", "buf", "conn", "done", "first", "if_stored", "rest", "since", "sock")

    def __init__(
        self,
        conn: Connection,
        sock: Any,
        done: Callable[[], None],
        since: float,
        retract: Collection[bytes],
        if_stored: Collection[bytes],
    ) -> None:
        self.conn = conn
        self.sock = sock
        self.done = done
        self.rest = conn.out[conn.sent :] + _deletes(retract) + SENTINEL
        #: Keys to delete once the command's own reply says STORED (``add``, ``cas``).
        self.if_stored = if_stored
        #: The command's own reply line (the first line read), once read.
        self.first: bytes | None = None
        #: Answers to :data:`SENTINEL` still to read.
        self.answers = 1
        #: What was read of the reply line before the caller's read timed out.
        self.buf, conn.unread = conn.unread, b""
        self.since = since

    def step(self, events: int) -> bool:
        """Send or read what ``events`` allow; return whether the fate is known."""
        try:
            if self.rest and events & select.POLLOUT:
                self.rest = self.rest[self.sock.send(self.rest) :]
            if events & _IN:
                data = self.sock.recv(65536)
                if not data:  # the server closed it: it runs nothing more from it
                    return True
                return self._answered(data)
        except BlockingIOError:
            return False
        except OSError:  # the connection failed: nothing more runs from it
            return True
        return False

    def _answered(self, data: bytes) -> bool:
        """Whether the replies read so far end with the last answer awaited. An ``add``
        or ``cas`` that stored is retracted then (its value is its caller's, who was
        told it failed): a delete and another :data:`SENTINEL` go out."""
        lines = (self.buf + data).split(b"\r\n")
        self.buf = lines.pop()
        if lines and self.first is None:
            self.first = lines[0]
        self.answers -= sum(1 for line in lines if line.startswith(_ANSWER))
        if self.if_stored and self.first == b"STORED":
            self.rest += _deletes(self.if_stored) + SENTINEL
            self.answers += 1
            self.if_stored = ()
        if self.answers <= 0:
            return True
        return len(self.buf) > MAX_LINE  # not memcached's protocol: give up on it


def _deletes(keys: Collection[bytes]) -> bytes:
    return b"".join(b"delete " + key + b"\r\n" for key in keys)


class Reaper:
    """The thread that learns the fate of abandoned writes (see the module docstring).

    ``limit`` (seconds, on ``monotonic``) bounds how long a silent connection is kept.
    One per process (:func:`reaper`); tests build their own. The thread starts with the
    first connection adopted and waits in ``poll``.
    """

    def __init__(
        self, *, limit: float = LIMIT, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._entries: dict[int, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        #: Connections closed at ``limit`` without an answer.
        self.expired = 0
        _fork.track(self)

    def adopt(
        self,
        conn: Connection,
        done: Callable[[], None],
        retract: Collection[bytes] = (),
        if_stored: Collection[bytes] = (),
    ) -> None:
        """Take ``conn``, whose last command timed out after bytes of it were sent, and
        call ``done()`` (from the reaper's thread) once memcached has answered it, the
        connection failed, or ``limit`` passed. ``done`` closes the connection. The
        keys in ``retract`` are deleted right behind the command, on ``conn``; those in
        ``if_stored`` once its reply says it stored (an ``add``, a ``cas``)."""
        sock = conn.sock
        if sock is None:
            done()
            return
        entry = _Entry(conn, sock, done, self._monotonic(), retract, if_stored)
        sock.setblocking(False)
        with self._lock:
            self._entries[sock.fileno()] = entry
            if self._thread is None:
                self._wake = os.pipe()
                self._thread = threading.Thread(
                    target=self._run, name="cachechain-fates", daemon=True
                )
                self._thread.start()
            wake = self._wake
        if wake is not None:
            os.write(wake[1], b"\0")

    def pending(self) -> int:
        """How many connections are in doubt now."""
        with self._lock:
            return len(self._entries)

    def wait_sent(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until the reaper has sent everything it had
        to send (the rest of each command, its retraction, its ``version``); return
        whether it has. Tests use it before counting a server's bytes."""
        with self._sent:
            return self._sent.wait_for(self._all_sent, timeout)

    def _all_sent(self) -> bool:
        return not any(entry.rest for entry in self._entries.values())

    def _run(self) -> None:
        while True:
            with self._lock:
                entries = dict(self._entries)
                wake = self._wake
            if wake is None:  # pragma: no cover - only after a fork, in a stale thread
                return
            poller = select.poll()
            poller.register(wake[0], select.POLLIN)
            for fd, entry in entries.items():
                poller.register(fd, _IN | (select.POLLOUT if entry.rest else 0))
            for fd, events in poller.poll(self._timeout_ms(entries)):
                if fd == wake[0]:
                    os.read(wake[0], 4096)
                elif fd in entries and entries[fd].step(events):
                    self._finish(fd, entries[fd])
            self._expire(entries)
            with self._sent:
                self._sent.notify_all()

    def _timeout_ms(self, entries: dict[int, _Entry]) -> int | None:
        """Milliseconds until the oldest entry's ``limit``; None (no timeout) if none."""
        if not entries:
            return None
        oldest = min(entry.since for entry in entries.values())
        return max(0, int((oldest + self.limit - self._monotonic()) * 1000) + 1)

    def _expire(self, entries: dict[int, _Entry]) -> None:
        now = self._monotonic()
        for fd, entry in entries.items():
            if now - entry.since >= self.limit:
                self.expired += 1
                _log_once(
                    ("fates", entry.conn.server),
                    "memcached %s:%s answered no write for %.0fs: its keys are released, "
                    "and the server may still run that write when it resumes",
                    *entry.conn.server,
                    self.limit,
                )
                self._finish(fd, entry)

    def _finish(self, fd: int, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(fd) is not entry:
                return
            del self._entries[fd]
        try:
            entry.done()
        except Exception:  # pragma: no cover - done() closes a socket and releases keys
            log.exception("releasing a write in doubt failed")

    def _after_fork(self) -> None:
        # The parent's thread does not exist here and its sockets are the pool's to
        # close; the wake pipe is the parent's.
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._entries = {}
        self._thread = None
        self._wake = None


_REAPER = Reaper()


def reaper() -> Reaper:
    """This process's :class:`Reaper`."""
    return _REAPER
