"""Outages stay bounded (issue 10, point 6).

While a shared layer is unreachable, neither Django's session ``create()`` loop (10,000
``add`` attempts per login) nor a stream of failed writes may grow memory without bound
or empty the in-process layer: a failed atomic operation owes no repair, and past
``WriterConfig.max_repairs`` a writer handles its layer as a whole (it overflows).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="cachechain-test-secret-key",
        ALLOWED_HOSTS=["testserver"],  # as tests/test_contrib_django.py configures it
        INSTALLED_APPS=[],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}},
    )
    django.setup()

from django.contrib.sessions.backends import base as sessions_base
from django.contrib.sessions.backends.cache import SessionStore
from django.core.cache import caches
from django.test.utils import override_settings

from cachechain import Chain, LayerConfig, LayerUnavailableError, MemoryLayer, WriterConfig
from cachechain.contrib.django import CachechainCache, close_chains
from tests.support.fakes import FakeLayer

#: Bytes that one more failed login may add to the traced memory (before the fix, a
#: chain with two remote layers grew by about 2.2 MB per login).
LOGIN_GROWTH = 250_000


@pytest.fixture
def dead_address() -> Iterator[str]:
    """An address where nothing listens: a port held bound and never listening, so
    every connection is refused and no other server can take the port meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def fast_session_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Django draws each attempt's 32 characters from the system's random source,
    which costs more than the cache calls measured here: a counter stands in."""
    counter = itertools.count()
    monkeypatch.setattr(
        sessions_base, "get_random_string", lambda length, chars: f"{next(counter):0{length}x}"
    )


@contextlib.contextmanager
def session_cache(address: str, *, remote_layers: int, coherence: bool) -> Iterator[Any]:
    """Cache-backed Django sessions over an L1 and ``remote_layers`` memcached layers
    at ``address``; yields the cache backend."""
    remote = [
        {
            "type": "memcached",
            "name": f"L{i + 2}",
            "servers": [address],
            "key_prefix": f"r{i}:",
            "timeout": 0.05,
            "connect_timeout": 0.05,
        }
        for i in range(remote_layers)
    ]
    config = {
        "default": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "OPTIONS": {
                "name": "sessions",
                "coherence": coherence,
                "layers": [{"type": "memory", "name": "L1", "maxsize": 10_000}, *remote],
            },
        }
    }
    with override_settings(
        CACHES=config,
        SESSION_ENGINE="django.contrib.sessions.backends.cache",
        SESSION_CACHE_ALIAS="default",
    ):
        try:
            cache = caches["default"]
            assert isinstance(cache, CachechainCache)
            yield cache
        finally:
            close_chains()


class DownLayer(FakeLayer):
    """A fake shared layer whose every call fails while ``down``, each time with a new
    exception, and that records no calls: memory that would be the test's own
    (FakeLayer logs every call, and its ``fail`` raises one instance again and again,
    each raise chaining the frames of the last into its traceback)."""

    down = False

    def _enter(self, op: str, arg: Any) -> None:
        if self.down:
            raise LayerUnavailableError("down", layer=self.name)


def failed_logins(count: int) -> None:
    for _ in range(count):
        with pytest.raises(RuntimeError, match="cache is unavailable"):
            SessionStore().create()  # 10,000 attempts: add() never gets through


def pending_repairs(chain: Chain) -> int:
    return sum(w.stats().repairing for w in chain.writers.values())


def traced_growth(logins: int) -> int:
    """Bytes the traced memory grew by over ``logins`` failed logins, once a first
    login has warmed every cache and pool up."""
    failed_logins(1)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        failed_logins(logins)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("remote_layers", [1, 2])
@pytest.mark.usefixtures("fast_session_keys")
def test_the_session_create_loop_neither_empties_l1_nor_grows_memory(
    dead_address: str, remote_layers: int
) -> None:
    """Two remote layers: before the fix each failed ``add`` left a repair delete on
    the upper one (10,000 per login, about 2.2 MB)."""
    with session_cache(dead_address, remote_layers=remote_layers, coherence=False) as cache:
        chain = cache.chain
        l1 = chain.layers[0]
        for i in range(100):  # what the app had cached before memcached went away
            l1.set(cache.make_key(f"other:{i}"), i)
        grown = traced_growth(1)
        assert pending_repairs(chain) == 0
        assert not any(w.overflowed for w in chain.writers.values())
        assert [cache.get(f"other:{i}") for i in range(100)] == list(range(100))
        assert grown < LOGIN_GROWTH, f"memory grew by {grown} bytes over a failed login"


@pytest.mark.slow
@pytest.mark.usefixtures("fast_session_keys")
def test_the_session_create_loop_stays_bounded_with_coherence_on(dead_address: str) -> None:
    """With coherence on (the default) the in-process layer is also dropped every
    coherence bound while memcached cannot be polled (the journal's rule, see
    docs/coherence.md), so only repairs and memory are checked here."""
    with session_cache(dead_address, remote_layers=1, coherence=True) as cache:
        grown = traced_growth(1)
        assert pending_repairs(cache.chain) == 0
        assert grown < LOGIN_GROWTH, f"memory grew by {grown} bytes over a failed login"


def test_failed_writes_past_max_repairs_handle_the_layer_as_a_whole() -> None:
    """A long outage of the shared layer under a stream of sets: at most
    ``max_repairs`` repairs are kept, then the layer is not read (it may keep any older
    value) until the overflow handler made those values invisible."""
    l1, l2 = MemoryLayer("L1", maxsize=1000), DownLayer("L2")
    l2.data["before"] = ("value from before the outage", None)
    writer_config = WriterConfig(max_repairs=500, retry_delay=600, max_retry_delay=600)
    layers: list[MemoryLayer | LayerConfig] = [l1, LayerConfig(l2, resilient=False)]
    with Chain(layers, coherence=False, writer=writer_config) as chain:
        writer = chain.writers["L2"]
        l2.down = True
        for i in range(1000):
            assert chain.set(f"k{i}", i) is False
        gc.collect()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            for i in range(1000, 21_000):
                chain.set(f"k{i}", i)
            chain.set("before", "newer value")  # missed by L2: it keeps the old one
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        stats = writer.stats()
        assert stats.overflowed and stats.overflows == 1 and stats.repairing == 0
        # Without the cap: about 4.4 MB (one repair per key); with it, L1's churn only.
        assert grown < 1_000_000, f"memory grew by {grown} bytes over 20,000 failed sets"
        assert l1.get("k20999") == 20999  # L1 keeps what this process wrote
        l2.down = False  # the layer is back, with its older values...
        l1.delete("before")
        assert chain.get("before") is None  # ...which are not read meanwhile
        assert not chain.flush(5.0)  # no handler yet: it stays overflowed

        def move_generation() -> bool:  # what a chain's handler makes of the layer
            l2.data.clear()
            return True

        writer.overflow_handler = move_generation
        assert chain.flush(5.0) and not writer.overflowed
        assert chain.get("before") is None and chain.get("k5") is None
        assert chain.set("after", 1) and l2.get("after") == 1
        l1.clear()
        assert chain.get("after") == 1  # read from L2 again
