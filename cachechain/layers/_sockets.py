"""Sockets whose read and write timeouts the kernel enforces.

Python's own socket timeouts (``settimeout(t)``) make the socket non-blocking and call
``poll()`` before every ``recv`` and ``send``: two more system calls on every memcached
round trip, about 2 µs of a 22 µs loopback ``get`` on the benchmark machine. A blocking
socket with ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` set makes no extra call: the kernel
bounds each read and write itself, and a read or write that times out fails with
``EAGAIN``, which Python raises as :class:`BlockingIOError`.

:func:`timed_socket_module` returns what pymemcache's ``socket_module`` argument takes:
the :mod:`socket` module with ``socket`` replaced by a class that sets both options once
connected. The client is then given ``timeout=None`` (a blocking socket); connecting
still uses Python's timeout (``connect_timeout``), once per connection.

Only on Linux, where both options are documented for TCP sockets and take a
``struct timeval``; elsewhere :data:`SUPPORTED` is false and callers keep Python's
timeouts.
"""

from __future__ import annotations

import socket
import struct
import sys
import types
from typing import Any

#: Whether kernel timeouts are used on this platform.
SUPPORTED = sys.platform.startswith("linux")


def timeval(seconds: float) -> bytes:
    """``seconds`` (> 0) as a native ``struct timeval``, rounded up to a microsecond
    (a zero timeval would mean "no timeout")."""
    micros = max(1, int(-(-seconds * 1_000_000 // 1)))
    return struct.pack("@ll", *divmod(micros, 1_000_000))


class _TimedSocket(socket.socket):
    """A ``socket.socket`` that sets the kernel read and write timeouts once connected."""

    __slots__ = ()
    _io_timeval: bytes = b""  # set by each subclass that timed_socket_module makes

    def connect(self, address: Any) -> None:
        super().connect(address)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._io_timeval)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._io_timeval)


def timed_socket_module(timeout: float) -> types.ModuleType:
    """A stand-in for the :mod:`socket` module whose sockets time out every read and
    write after ``timeout`` seconds (kernel-enforced; see the module docstring)."""
    timed = type("TimedSocket", (_TimedSocket,), {"__slots__": (), "_io_timeval": timeval(timeout)})
    module = types.ModuleType(f"{__name__}.timed")

    def __getattr__(name: str) -> Any:  # everything else is the real socket module's
        return getattr(socket, name)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.socket = timed  # type: ignore[attr-defined]
    return module
