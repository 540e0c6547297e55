"""Issue 10, atomic operations: a failed ``incr`` is not a missing key.

``Chain.add``/``incr``/``decr``/``touch`` take ``strict=True`` to raise
:class:`~cachechain.UnconfirmedError` when the shared layer did not confirm the
operation (it may have been made: a reply lost to a timeout). Flask-Caching's ``inc``
and Django's ``incr`` use it, so a count that timed out after memcached made it is never
retried as a create (counted twice). Faults: a fake shared layer that makes the change
and then times out, and a real memcached behind the TCP fault proxy that holds its
replies past the layer's timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="cachechain-test-secret-key",
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}},
    )
    django.setup()

import cachechain
from cachechain import (
    BreakerConfig,
    Chain,
    CircuitOpenError,
    InvalidValueError,
    LayerConfig,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    MemcachedLayer,
    MemoryLayer,
    UnconfirmedError,
)
from cachechain.contrib.django import CachechainCache, close_chains
from cachechain.contrib.flask import CachechainBackend
from tests.support.fakes import FakeClock, FakeLayer
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess

SECRET = "strict-test-secret"
#: The shared layer's timeout (s), and how long the proxy holds each reply (s): the
#: command reaches memcached at once, its reply arrives after the caller gave up.
#: The proxy tests' call timeout, and the latency that makes a reply come after it: as
#: loose as the point allows (0.1 s timed out the first, healthy call on a loaded CI
#: machine running three suites on two cores).
TIMEOUT = 0.5
LATE = 2.0


class LateLayer(FakeLayer):
    """A fake shared layer whose next atomic operations named in ``late`` (operation ->
    how many) are made, then time out (the reply lost on its way back), as memcached's
    do behind a slow network."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.late: dict[str, int] = {}

    def _then_late(self, operation: str, result: Any) -> Any:
        if self.late.get(operation):
            self.late[operation] -= 1
            raise LayerTimeoutError("reply lost after the change was made", layer=self.name)
        return result

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        stored: bool = self._then_late("add", super().add(key, value, ttl))
        return stored

    def incr(self, key: str, delta: int = 1) -> int | None:
        count: int | None = self._then_late("incr", super().incr(key, delta))
        return count

    def decr(self, key: str, delta: int = 1) -> int | None:
        count: int | None = self._then_late("decr", super().decr(key, delta))
        return count

    def touch(self, key: str, ttl: float | None = None) -> bool:
        found: bool = self._then_late("touch", super().touch(key, ttl))
        return found


@pytest.fixture()
def late() -> Iterator[tuple[Chain, LateLayer]]:
    """L1 over a late fake shared layer (coherence off: its keys are read as sent)."""
    clock = FakeClock()
    fake = LateLayer("L2", clock=clock)
    chain = Chain([MemoryLayer("L1", clock=clock), fake], coherence=False)
    yield chain, fake
    chain.close()


# -- the chain ---------------------------------------------------------------------------


def test_unconfirmed_error_is_public_and_a_layer_error() -> None:
    assert cachechain.UnconfirmedError is UnconfirmedError
    assert "UnconfirmedError" in cachechain.__all__
    assert issubclass(UnconfirmedError, LayerError)
    assert not issubclass(UnconfirmedError, ValueError)  # never Django's "not found"
    assert UnconfirmedError.__doc__


def test_strict_incr_raises_when_the_count_may_have_been_made(
    late: tuple[Chain, LateLayer],
) -> None:
    chain, fake = late
    chain.set("n", 5)
    fake.late = {"incr": 1}
    with pytest.raises(UnconfirmedError, match="may have been made") as info:
        chain.incr("n", strict=True)
    assert isinstance(info.value.__cause__, LayerTimeoutError)
    assert info.value.layer == "L2" and info.value.error_type == "timeout"
    assert info.value.trips_breaker is False
    assert fake.data["n"][0] == 6  # made once, on the shared layer
    assert chain.incr("n", strict=True) == 7
    assert chain.incr("absent", strict=True) is None  # absent: an answer, not an error
    assert "absent" not in fake.data


def test_without_strict_a_failure_is_still_none_or_false(late: tuple[Chain, LateLayer]) -> None:
    chain, fake = late
    chain.set("n", 5)
    fake.late = {"incr": 2, "add": 1, "touch": 1}
    assert chain.incr("n") is None
    assert chain.decr("n", floor=False) is None  # made as an incr of 2**64 - 1
    assert chain.add("k", 1) is False
    assert chain.touch("n", 10) is False
    assert fake.data["n"][0] == 5 and fake.data["k"][0] == 1  # each was made


def test_strict_add_decr_and_touch(late: tuple[Chain, LateLayer]) -> None:
    chain, fake = late
    fake.late = {"add": 1}
    with pytest.raises(UnconfirmedError):
        chain.add("lock", "me", 30, strict=True)
    assert fake.data["lock"][0] == "me"  # the lock was taken: the caller cannot know
    assert chain.add("lock", "you", 30, strict=True) is False  # held: an answer
    chain.set("n", 1)
    fake.late = {"decr": 1, "touch": 1}
    with pytest.raises(UnconfirmedError):
        chain.decr("n", 5, strict=True)
    with pytest.raises(UnconfirmedError):
        chain.touch("n", 10, strict=True)
    assert fake.data["n"][0] == 0  # the decr was made (memcached's floor at 0)
    assert chain.decr("n", 2, floor=False, strict=True) == -2
    assert chain.touch("gone", 10, strict=True) is False


def test_strict_add_of_a_refused_value_is_false() -> None:
    """A value the shared layer refuses is not stored: a confirmed answer."""
    fake = FakeLayer("L2")
    with Chain([MemoryLayer("L1"), fake], coherence=False) as chain:
        fake.fail = InvalidValueError("the codec cannot encode it")
        assert chain.add("k", object(), strict=True) is False


def test_strict_raises_when_the_breaker_refuses_or_a_write_is_owed() -> None:
    fake = FakeLayer("L2")
    breaker = BreakerConfig(max_failures=2)
    with Chain([MemoryLayer("L1"), LayerConfig(fake, breaker=breaker)], coherence=False) as chain:
        chain.set("n", 1)
        fake.fail = LayerUnavailableError("down", layer="L2")
        assert chain.set("n", 2) is False  # a repair of "n" is owed to L2 now
        with pytest.raises(UnconfirmedError, match="was not made") as info:
            chain.incr("n", strict=True)  # the repair cannot land: not even sent
        assert isinstance(info.value.__cause__, LayerUnavailableError)
        assert chain.breakers["L2"].state.name == "OPEN"
        with pytest.raises(UnconfirmedError, match="was not made") as info:
            chain.incr("other", strict=True)
        assert isinstance(info.value.__cause__, CircuitOpenError)
        assert fake.ops("incr") == []


def test_strict_must_be_a_bool(late: tuple[Chain, LateLayer]) -> None:
    chain, fake = late
    for call in (
        lambda: chain.add("k", 1, strict=1),  # type: ignore[arg-type]
        lambda: chain.incr("k", strict="yes"),  # type: ignore[arg-type]
        lambda: chain.decr("k", strict=None),  # type: ignore[arg-type]
        lambda: chain.touch("k", strict=0),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidValueError, match="strict"):
            call()
    assert fake.calls == []


def test_a_strict_failure_is_counted_once_and_the_key_published() -> None:
    published: list[list[str]] = []
    fake = LateLayer("L2")
    with Chain([MemoryLayer("L1"), fake], coherence=False) as chain:
        chain._publish_invalidation = lambda keys: published.append(list(keys))  # type: ignore[method-assign]
        chain.set("n", 1)
        published.clear()
        fake.late = {"incr": 1}
        with pytest.raises(UnconfirmedError):
            chain.incr("n", strict=True)
        assert published == [["n"]]  # it may have changed there: others drop their copy
        assert chain.breakers["L2"].stats().consecutive_failures == 1


# -- Flask-Caching's inc ------------------------------------------------------------------


def flask_over(chain: Chain) -> CachechainBackend:
    """A Flask backend whose chain is ``chain`` (built over a memory layer, swapped)."""
    backend = CachechainBackend({"layers": [{"type": "memory", "name": "L1"}]})
    backend._chain.close()
    backend._chain = chain
    return backend


def test_flask_inc_never_counts_twice_when_incr_times_out(late: tuple[Chain, LateLayer]) -> None:
    chain, fake = late
    backend = flask_over(chain)
    assert backend.inc("hits") == 1  # absent: started with add
    fake.late = {"incr": 1}
    assert backend.inc("hits") is None  # made, reply lost: not taken for "absent"
    assert fake.data["hits"][0] == 2  # counted once
    assert fake.ops("incr") == ["hits", "hits"] and fake.ops("add") == ["hits"]
    assert backend.inc("hits") == 3


def test_flask_inc_never_counts_twice_when_its_add_times_out(
    late: tuple[Chain, LateLayer],
) -> None:
    chain, fake = late
    backend = flask_over(chain)
    fake.late = {"add": 1}
    assert backend.dec("absent", 3) is None  # the add stored -3, its reply was lost
    assert fake.data["absent"][0] == -3  # not -6: the decr was not tried again
    assert fake.ops("incr") == ["absent"]  # the first try only (absent then)


# -- real memcached, replies held past the timeout -------------------------------------


def layers_at(address: str) -> list[dict[str, Any]]:
    return [
        {"type": "memory", "name": "L1"},
        {
            "type": "memcached",
            "name": "L2",
            "servers": [address],
            "key_prefix": "st:",
            "timeout": TIMEOUT,
            "connect_timeout": 1.0,
        },
    ]


def memcached_only(address: str) -> list[dict[str, Any]]:
    return layers_at(address)[1:]


@pytest.mark.memcached
def test_flask_inc_counts_once_when_memcached_answers_too_late(
    memcached: MemcachedProcess,
) -> None:
    """memcached makes the incr, its reply comes after the timeout: ``inc`` returns
    None and the count moved by one (before: the failed incr was taken for a missing
    key, so ``inc`` tried ``add`` and ``incr`` again and counted twice)."""
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        backend = CachechainBackend({"layers": layers_at(proxy.address)}, secret=SECRET)
        reader = CachechainBackend(
            {"name": "reader", "layers": memcached_only(memcached.address)}, secret=SECRET
        )
        try:
            assert backend.inc("hits") == 1
            assert backend.inc("hits") == 2  # a native memcached counter from now on
            sent = proxy.stats().bytes_to_clients
            proxy.latency(LATE)
            assert backend.inc("hits") is None
            # memcached answered (so it ran the incr), the proxy passed the reply on.
            assert proxy.wait_until(lambda s: s.bytes_to_clients > sent, 10.0)
            proxy.pass_through()
            assert reader.get("hits") == 3
        finally:
            backend.close()
            reader.close()


@pytest.mark.memcached
def test_django_incr_raises_unconfirmed_not_value_error_when_memcached_answers_too_late(
    memcached: MemcachedProcess,
) -> None:
    """Django's incr raises ValueError only for a missing key; a timeout after memcached
    counted raises UnconfirmedError (as PyMemcacheCache raises its client's error), so
    ``try: incr() except ValueError: add()`` never starts the count again."""
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        params = {"OPTIONS": {"name": "strict-dj", "layers": layers_at(proxy.address)}}
        params["OPTIONS"]["layers"][1]["codec"] = {"type": "signed_pickle", "secret": SECRET}
        cache = CachechainCache("", params)
        codec = {"type": "signed_pickle", "secret": SECRET}  # the same namespace tag
        reader = Chain.from_config(
            {
                "name": "strict-dj-reader",
                "layers": [{**memcached_only(memcached.address)[0], "codec": codec}],
            }
        )
        try:
            with pytest.raises(ValueError, match="not found"):
                cache.incr("hits")
            cache.set("hits", 1)
            assert cache.incr("hits") == 2
            assert cache.incr("hits") == 3  # a native memcached counter from now on
            sent = proxy.stats().bytes_to_clients
            proxy.latency(LATE)
            with pytest.raises(UnconfirmedError) as info:
                cache.incr("hits")
            assert not isinstance(info.value, ValueError)
            assert proxy.wait_until(lambda s: s.bytes_to_clients > sent, 10.0)
            proxy.pass_through()
            assert reader.get(cache.make_key("hits")) == 4  # counted once
        finally:
            reader.close()
            close_chains()


@pytest.mark.memcached
def test_flask_inc_from_many_threads_still_counts_each_call_once(
    memcached: MemcachedProcess,
) -> None:
    backend = CachechainBackend({"layers": layers_at(memcached.address)}, secret=SECRET)
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        for _ in range(25):
            backend.inc("n")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert backend.get("n") == 100
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("flags", "stored"),
    [(0, b"not an envelope"), (2, b"12ab")],  # garbage; counter bytes that are no number
)
def test_an_unreadable_value_is_absent_for_atomic_operations_strict_or_not(
    memcached: MemcachedProcess, flags: int, stored: bytes
) -> None:
    """Bytes the layer cannot read are a miss for ``get`` (counted as corrupt); an
    ``incr``, ``decr`` or ``touch`` of them changes nothing and must say "absent", not
    "may have been made": strict ones raised ``UnconfirmedError`` (Django's ``incr``
    let it reach the view), and counter bytes that are no number made ``incr`` spin 32
    rounds of compare-and-set, then fail as contended."""
    l2 = MemcachedLayer("L2", memcached.address, key_prefix="corrupt:")
    chain = Chain([MemoryLayer("L1"), l2], coherence=False)
    try:
        mkey = b"corrupt:k"
        head = b"set %s %d 0 %d\r\n" % (mkey, flags, len(stored))
        assert memcached.raw(head + stored + b"\r\n") == b"STORED\r\n"
        assert chain.get("k") is None
        for strict in (False, True):
            assert chain.incr("k", strict=strict) is None
            assert chain.decr("k", strict=strict) is None
            assert chain.touch("k", 10, strict=strict) is False
        assert l2.stats().corrupt_values == 7  # the get, then each operation's read
        assert memcached.raw(b"get " + mkey + b"\r\n").split(b"\r\n")[1] == stored
    finally:
        chain.close()
