"""Shared fixtures: one real memcached for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fakes import UNPICKLED
from tests.support.servers import MemcachedProcess


@pytest.fixture(autouse=True)
def _clear_unpickled() -> None:
    """Start every test with no trace of an unpickled ``Boom``."""
    UNPICKLED.clear()


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedProcess]:
    """A real memcached on a free loopback port, shared by the session."""
    server = MemcachedProcess().start()
    yield server
    server.stop()


@pytest.fixture()
def memcached(memcached_server: MemcachedProcess) -> MemcachedProcess:
    """The session's memcached, flushed before the test."""
    if memcached_server.proc is None or memcached_server.proc.poll() is not None:
        memcached_server.start()
    assert memcached_server.raw(b"flush_all\r\n").startswith(b"OK")
    return memcached_server


@pytest.fixture()
def own_memcached() -> Iterator[MemcachedProcess]:
    """A memcached of the test's own, which the test may kill and restart."""
    server = MemcachedProcess().start()
    yield server
    server.stop()
