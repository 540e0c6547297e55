"""A loopback proxy that can hold back what clients send: the network that delivers an
abandoned write late (issue 11, item 1).

:class:`HoldingProxy` forwards every connection to one upstream. While :meth:`hold` is
armed, the next chunk a client sends is delivered ``delay`` seconds late (the pump of
that connection waits, so what that client sends after it waits too: TCP's order). Other
connections pass at once. :attr:`held` is set once a chunk is being held, and
:attr:`delivered` once it reached the upstream, so a test waits on events, not sleeps.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["HoldingProxy"]


class HoldingProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; hold one chunk on demand."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._delay: float | None = None
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        #: Set when a chunk starts being held, and when it was delivered.
        self.held = threading.Event()
        self.delivered = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """``host:port`` of the proxy."""
        return f"127.0.0.1:{self.port}"

    def hold(self, delay: float) -> None:
        """Deliver the next chunk any client sends ``delay`` seconds late."""
        self.held.clear()
        self.delivered.clear()
        with self._lock:
            self._delay = delay

    def _take_delay(self) -> float | None:
        with self._lock:
            delay, self._delay = self._delay, None
            return delay

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                delay = self._take_delay() if from_client else None
                if delay is not None:
                    self.held.set()
                    if self._stop.wait(delay):
                        return
                dst.sendall(data)
                if delay is not None:
                    self.delivered.set()
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    def __enter__(self) -> HoldingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
