"""ResilientLayer: a layer behind a circuit breaker, with slow calls counted as failures.

Fake layers inject the faults (errors, slow calls measured on an injected clock, calls
blocked on an Event or a Barrier); a real :class:`MemoryLayer` checks that every
operation passes through unchanged. Fault-matrix rows: 7 (16 threads in half-open),
10 (invalid input does not trip), and the timeout rows' "counted as a failure" part.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from cachechain._errors import (
    CircuitOpenError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from cachechain._resilience import BreakerStats, CircuitBreaker, CircuitState, ResilientLayer
from cachechain.layers import BaseLayer, LayerProxy
from cachechain.layers._base import MISSING, CacheLayer
from cachechain.layers._memcached import MemcachedLayer
from cachechain.layers._memory import MemoryLayer
from tests.support.fakes import FakeClock
from tests.support.servers import MemcachedProcess

WAIT = 10.0  # seconds: the most any thread test waits before it fails

T = TypeVar("T")


class _Store(BaseLayer):
    """A dict of values, each read back with 5 seconds to live; TTLs are ignored."""

    def __init__(self, name: str) -> None:
        super().__init__(name, max_ttl=3600.0)
        self.data: dict[str, Any] = {}

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        return (self.data[key], 5.0) if key in self.data else (MISSING, None)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


class FakeLayer(LayerProxy):
    """A remote-looking layer that records calls and injects faults (a proxy over a
    dict store).

    ``error`` is raised by every operation; ``delay`` seconds are added to ``clock``
    during each call (a slow call without any waiting); ``hook`` runs inside each call
    (to block on an Event or a Barrier).
    """

    def __init__(self, name: str = "L2", clock: FakeClock | None = None) -> None:
        store = _Store(name)
        super().__init__(store)
        self.clock = clock
        self.calls: list[str] = []
        self.error: BaseException | None = None
        self.delay = 0.0
        self.hook: Callable[[], object] | None = None
        self.data = store.data
        self.closed = 0

    def _forward(self, method: Callable[..., T], *args: Any) -> T:
        self.calls.append(method.__name__)
        if self.hook is not None:
            self.hook()
        if self.clock is not None:
            self.clock.advance(self.delay)
        if self.error is not None:
            raise self.error
        return method(*args)

    def close(self) -> None:
        self.closed += 1


class TimedFakeLayer(FakeLayer):
    """A fake layer with a socket ``timeout`` attribute, as the memcached layer has."""

    timeout = 0.25


# every operation of the protocol, with arguments and what the fake returns on a miss
OPS: list[tuple[str, tuple[Any, ...], Any]] = [
    ("get", ("k",), MISSING),
    ("get_with_ttl", ("k",), (MISSING, None)),
    ("get_many", (["k", "j"],), {}),
    ("get_many_with_ttl", (["k", "j"],), {}),
    ("set", ("k", 1, 10.0), None),
    ("set_many", ({"k": 1}, 10.0), []),
    ("delete", ("k",), None),
    ("delete_many", (["k"],), None),
]
OP_IDS = [op[0] for op in OPS]


def wrap(
    layer: FakeLayer | None = None,
    *,
    clock: FakeClock | None = None,
    timeout: float | None = None,
    **breaker_kwargs: Any,
) -> tuple[ResilientLayer, FakeLayer, FakeClock]:
    clock = clock or FakeClock()
    layer = layer or FakeLayer(clock=clock)
    layer.clock = clock
    breaker_kwargs.setdefault("max_failures", 2)
    breaker_kwargs.setdefault("reset_timeout", 10.0)
    breaker = CircuitBreaker(layer.name, clock=clock, **breaker_kwargs)
    return ResilientLayer(layer, breaker=breaker, timeout=timeout, clock=clock), layer, clock


def invoke(r: ResilientLayer, op: str, args: tuple[Any, ...]) -> Any:
    return getattr(r, op)(*args)


# -- construction and pass-through -------------------------------------------------------


def test_reexports() -> None:
    from cachechain import _breaker as breaker

    assert CircuitBreaker is breaker.CircuitBreaker
    assert CircuitState is breaker.CircuitState
    assert BreakerStats is breaker.BreakerStats


def test_implements_the_layer_protocol_and_passes_attributes_through() -> None:
    layer = FakeLayer("remote")
    r = ResilientLayer(layer)
    assert isinstance(r, CacheLayer)
    assert r.name == "remote"
    assert r.local is False
    assert r.max_ttl == 3600.0
    assert r.layer is layer
    assert isinstance(r.breaker, CircuitBreaker)
    assert r.breaker.name == "remote"  # the default breaker is named after the layer
    assert r.timeout is None  # the fake has no timeout attribute
    assert r.rejected == 0
    assert r.stats() == BreakerStats(CircuitState.CLOSED, 0, 0, 0, 0)
    assert repr(r) == f"<ResilientLayer {layer!r} timeout=None>"


def test_local_layer_attributes_pass_through() -> None:
    mem = MemoryLayer("L1", max_ttl=60.0)
    r = ResilientLayer(mem)
    assert r.local is True
    assert r.max_ttl == 60.0
    assert r.name == "L1"


def test_every_operation_passes_through_to_a_real_layer() -> None:
    mem = MemoryLayer("L1", default_ttl=None)
    r = ResilientLayer(mem, timeout=5.0)
    assert r.get("a") is MISSING
    assert r.get_with_ttl("a") == (MISSING, None)
    r.set("a", 1)
    r.set("b", [2], ttl=30.0)
    assert r.get("a") == 1
    assert r.get_with_ttl("a") == (1, None)
    value, ttl = r.get_with_ttl("b")
    assert value == [2]
    assert ttl is not None and 0 < ttl <= 30.0
    assert r.set_many({"c": 3, "d": 4}) == []
    assert r.get_many(["a", "c", "zz"]) == {"a": 1, "c": 3}
    assert r.get_many_with_ttl(["c", "zz"]) == {"c": (3, None)}
    r.delete("a")
    r.delete_many(["c", "d"])
    assert r.get_many(["a", "b", "c", "d"]) == {"b": [2]}
    assert mem.get("b") == [2]
    stats = r.stats()
    assert stats.state is CircuitState.CLOSED
    assert stats.consecutive_failures == 0


def test_timeout_defaults_to_the_layers_own() -> None:
    layer = TimedFakeLayer()
    assert ResilientLayer(layer).timeout == 0.25
    assert ResilientLayer(layer, timeout=1).timeout == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_invalid_timeout(bad: Any) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        ResilientLayer(FakeLayer(), timeout=bad)


def test_invalid_layer_timeout_attribute_is_named() -> None:
    layer = FakeLayer()
    layer.timeout = -2  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"layer\.timeout"):
        ResilientLayer(layer)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="layer"):
        ResilientLayer(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="breaker"):
        ResilientLayer(FakeLayer(), breaker="b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clock"):
        ResilientLayer(FakeLayer(), clock=None)  # type: ignore[arg-type]


def test_close_closes_the_wrapped_layer_even_when_open() -> None:
    r, layer, _ = wrap(max_failures=1)
    layer.error = LayerUnavailableError("down")
    with pytest.raises(LayerUnavailableError):
        r.get("k")
    assert r.breaker.state is CircuitState.OPEN
    r.close()
    r.close()
    assert layer.closed == 2


# -- what counts, what does not -----------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 0.5])
@pytest.mark.parametrize(("op", "args", "result"), OPS, ids=OP_IDS)
def test_misses_and_successes_never_trip(
    op: str, args: tuple[Any, ...], result: Any, timeout: float | None
) -> None:
    r, layer, _ = wrap(max_failures=1, timeout=timeout)
    for _ in range(20):
        assert invoke(r, op, args) == result
    assert r.breaker.state is CircuitState.CLOSED
    assert layer.calls == [op] * 20


@pytest.mark.parametrize(
    "exc",
    [InvalidKeyError("bad key"), InvalidValueError("too large"), PoolExhaustedError("busy")],
    ids=["InvalidKeyError", "InvalidValueError", "PoolExhaustedError"],
)
@pytest.mark.parametrize(("op", "args", "result"), OPS, ids=OP_IDS)
def test_caller_errors_do_not_trip(
    op: str, args: tuple[Any, ...], result: Any, exc: Exception
) -> None:
    r, layer, _ = wrap(max_failures=1, timeout=0.5)
    layer.error = exc
    for _ in range(5):
        with pytest.raises(type(exc)) as info:
            invoke(r, op, args)
        assert info.value is exc  # re-raised unchanged
    stats = r.stats()
    assert stats.state is CircuitState.CLOSED
    assert stats.consecutive_failures == 0
    assert len(layer.calls) == 5


@pytest.mark.parametrize(
    "exc",
    [
        LayerTimeoutError("timed out", layer="L2"),
        TimeoutError(),
        ConnectionResetError(),
        KeyError(),
    ],
    ids=["LayerTimeoutError", "TimeoutError", "ConnectionResetError", "unknown"],
)
@pytest.mark.parametrize(("op", "args", "result"), OPS, ids=OP_IDS)
@pytest.mark.parametrize("timeout", [None, 0.5])
def test_backend_errors_trip_and_then_calls_are_refused(
    op: str, args: tuple[Any, ...], result: Any, exc: Exception, timeout: float | None
) -> None:
    r, layer, _ = wrap(max_failures=2, timeout=timeout)
    layer.error = exc
    with pytest.raises(type(exc)) as info:
        invoke(r, op, args)
    assert info.value is exc
    assert r.breaker.state is CircuitState.CLOSED
    with pytest.raises(type(exc)):
        invoke(r, op, args)
    assert r.breaker.state is CircuitState.OPEN
    layer.error = None
    for n in range(1, 4):  # refused at once, without touching the layer
        with pytest.raises(CircuitOpenError) as refused:
            invoke(r, op, args)
        assert refused.value.layer == "L2"
        assert r.rejected == n
    assert layer.calls == [op, op]


def test_interrupt_in_the_layer_is_neutral() -> None:
    r, layer, _ = wrap(max_failures=1)
    layer.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        r.get("k")
    with pytest.raises(KeyboardInterrupt):
        r.get_with_ttl("k")
    with pytest.raises(KeyboardInterrupt):
        r.delete("k")
    assert r.breaker.state is CircuitState.CLOSED


# -- slow calls -------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "args", "result"), OPS, ids=OP_IDS)
def test_slow_calls_count_as_failures_but_return_their_result(
    op: str, args: tuple[Any, ...], result: Any
) -> None:
    # binary fractions, so that the clock arithmetic is exact
    r, layer, _ = wrap(max_failures=2, timeout=0.25)
    layer.delay = 0.25  # exactly the timeout: not slow
    for _ in range(3):
        assert invoke(r, op, args) == result
    assert r.stats().consecutive_failures == 0
    layer.delay = 0.375
    assert invoke(r, op, args) == result  # slow, still answered
    assert r.stats().consecutive_failures == 1
    assert invoke(r, op, args) == result
    assert r.breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        invoke(r, op, args)
    assert len(layer.calls) == 5


def test_slow_hit_is_returned() -> None:
    r, layer, _ = wrap(max_failures=1, timeout=0.1)
    layer.data["k"] = "v"
    layer.delay = 1.0
    assert r.get("k") == "v"
    assert r.breaker.state is CircuitState.OPEN


def test_without_timeout_slow_calls_are_fine() -> None:
    r, layer, _ = wrap(max_failures=1, timeout=None)
    layer.delay = 100.0
    for _ in range(3):
        assert r.get("k") is MISSING
        assert r.get_with_ttl("k") == (MISSING, None)
        r.delete("k")
    assert r.breaker.state is CircuitState.CLOSED


def test_layer_timeout_used_for_slow_calls() -> None:
    clock = FakeClock()
    r, layer, _ = wrap(TimedFakeLayer(clock=clock), clock=clock, max_failures=1)
    assert r.timeout == 0.25
    layer.delay = 0.3
    r.get("k")
    assert r.breaker.state is CircuitState.OPEN


class PooledFakeLayer(TimedFakeLayer):
    """A fake layer with the memcached layer's three timeouts."""

    connect_timeout = 0.1
    pool_timeout = 0.3


def test_a_call_that_waited_for_the_pool_is_not_slow() -> None:
    """The pool's wait comes before the call's timeout starts (the memcached layer moves
    its deadline by it): a healthy call that waited is no failure. The threshold was
    the timeout plus the connect timeout alone, so such a call counted as slow, and a
    busy pool could open the breaker of a healthy server."""
    clock = FakeClock()
    r, layer, _ = wrap(PooledFakeLayer(clock=clock), clock=clock, max_failures=1)
    assert r.timeout == pytest.approx(0.25 + 0.1 + 0.3)
    layer.delay = 0.3 + 0.25  # waited for the pool, then ran within its timeout
    for _ in range(3):
        r.get("k")
    assert r.breaker.state is CircuitState.CLOSED
    layer.delay = 0.7
    r.get("k")
    assert r.breaker.state is CircuitState.OPEN


def test_memcached_layer_threshold_counts_its_three_timeouts() -> None:
    mc = MemcachedLayer("L2", "127.0.0.1:1", timeout=0.2, connect_timeout=0.1, pool_timeout=0.4)
    try:
        assert mc.pool_timeout == 0.4
        assert ResilientLayer(mc).timeout == pytest.approx(0.7)
    finally:
        mc.close()


@pytest.mark.parametrize(
    ("timeout", "name", "bad"),
    [
        (0.25, "pool_timeout", float("nan")),
        (0.25, "pool_timeout", True),
        (0.25, "connect_timeout", 0),  # a connect timeout is > 0; a pool timeout may be 0
        (None, "connect_timeout", "bad"),  # checked even when there is no threshold
        (None, "pool_timeout", -1.0),
    ],
)
def test_invalid_timeout_attributes_are_named(timeout: float | None, name: str, bad: Any) -> None:
    layer = PooledFakeLayer()
    layer.timeout = timeout  # type: ignore[assignment]
    setattr(layer, name, bad)
    with pytest.raises(ConfigError, match=rf"layer\.{name}"):
        ResilientLayer(layer)
    setattr(layer, name, 0.0 if name == "pool_timeout" else 0.5)
    connect, pool = (0.1, 0.0) if name == "pool_timeout" else (0.5, 0.3)
    expected = None if timeout is None else pytest.approx(timeout + connect + pool)
    assert ResilientLayer(layer).timeout == expected


def test_default_clock_times_real_calls() -> None:
    """With the default perf_counter clock, an instant call is never slow."""
    layer = FakeLayer()
    r = ResilientLayer(layer, breaker=CircuitBreaker("L2", max_failures=1), timeout=5.0)
    for _ in range(10):
        r.get("k")
    assert r.breaker.state is CircuitState.CLOSED


# -- recovery through half-open ------------------------------------------------------------


def test_recovers_through_a_half_open_trial() -> None:
    r, layer, clock = wrap(max_failures=2, timeout=0.5)
    layer.error = LayerUnavailableError("down")
    for _ in range(2):
        with pytest.raises(LayerUnavailableError):
            r.get("k")
    layer.error = None
    layer.data["k"] = "back"
    with pytest.raises(CircuitOpenError):
        r.get("k")
    clock.advance(10.0)
    assert r.get("k") == "back"  # the trial call
    assert r.breaker.state is CircuitState.CLOSED
    assert r.stats().trial_calls == 1


def test_a_slow_trial_reopens() -> None:
    r, layer, clock = wrap(max_failures=1, timeout=0.5)
    layer.error = LayerTimeoutError("t")
    with pytest.raises(LayerTimeoutError):
        r.get_with_ttl("k")
    layer.error = None
    clock.advance(10.0)
    layer.delay = 0.6
    assert r.get_with_ttl("k") == (MISSING, None)
    assert r.breaker.state is CircuitState.OPEN
    assert r.stats().opens == 2


def test_a_shared_breaker_guards_several_wrappers() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("L2", max_failures=1, clock=clock)
    a = FakeLayer(clock=clock)
    b = FakeLayer(clock=clock)
    ra = ResilientLayer(a, breaker=breaker, clock=clock)
    rb = ResilientLayer(b, breaker=breaker, clock=clock)
    a.error = LayerUnavailableError("down")
    with pytest.raises(LayerUnavailableError):
        ra.get("k")
    with pytest.raises(CircuitOpenError):
        rb.get("k")
    assert b.calls == []


# -- threads ---------------------------------------------------------------------------------


def test_half_open_lets_exactly_max_calls_through_under_16_threads() -> None:
    """Row 7: 16 threads arrive together in half-open; 3 trials reach the layer (which
    blocks them on an Event), the 13 others are refused without waiting, and counted."""
    r, layer, clock = wrap(max_failures=1, half_open_max_calls=3, timeout=None)
    layer.error = LayerUnavailableError("down")
    with pytest.raises(LayerUnavailableError):
        r.get("k")
    layer.error = None
    clock.advance(10.0)

    entered = threading.Semaphore(0)
    gate = threading.Event()

    def block() -> None:
        entered.release()
        assert gate.wait(WAIT)

    layer.hook = block
    start = threading.Barrier(16, timeout=WAIT)
    results: queue.Queue[tuple[str, object]] = queue.Queue()

    def worker() -> None:
        start.wait()
        try:
            results.put(("ok", r.get("k")))
        except CircuitOpenError as exc:
            results.put(("refused", exc))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        # the refusals all come back while the trials are still blocked in the layer
        refused = [results.get(timeout=WAIT) for _ in range(13)]
        assert [kind for kind, _ in refused] == ["refused"] * 13
        for _ in range(3):
            assert entered.acquire(timeout=WAIT)
        assert results.empty()
        assert not entered.acquire(blocking=False)  # no fourth call reached the layer
        assert layer.calls == ["get"] * 4  # the failure that opened it + 3 trials
        stats = r.stats()
        assert stats.state is CircuitState.HALF_OPEN
        assert stats.trial_calls == 3
        assert stats.rejected == 13
        assert r.rejected == 13
    finally:
        gate.set()
        for t in threads:
            t.join(WAIT)
    assert [results.get(timeout=WAIT) for _ in range(3)] == [("ok", MISSING)] * 3
    assert r.breaker.state is CircuitState.CLOSED


def test_the_breaker_lock_is_not_held_during_layer_calls() -> None:
    """pybreaker's bug: 10 threads each blocked in the layer until all 10 are inside
    together must all get through (a lock held across the call would break the barrier)."""
    r, layer, _ = wrap(timeout=None)
    barrier = threading.Barrier(10, timeout=WAIT)
    layer.hook = barrier.wait
    done: queue.Queue[object] = queue.Queue()

    def worker(i: int) -> None:
        try:
            r.set(f"k{i}", i)
            done.put(r.get(f"k{i}"))
        except BaseException as exc:  # pragma: no cover - reported by the asserts
            done.put(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(done.get(timeout=WAIT) for _ in range(10)) == list(range(10))  # type: ignore[type-var]
    assert not barrier.broken
    assert r.breaker.state is CircuitState.CLOSED


# -- against a real memcached ------------------------------------------------------------


@pytest.mark.memcached
def test_real_memcached_killed_then_restarted(own_memcached: MemcachedProcess) -> None:
    """Rows 1, 2 and 10 at the layer level: a dead memcached opens the breaker, calls are
    then refused without I/O; after a restart one trial closes it again. A value too large
    for memcached and a non-str key are the caller's problem and never trip it."""
    clock = FakeClock()
    mc = MemcachedLayer("L2", own_memcached.address, connect_timeout=0.3, timeout=0.3)
    breaker = CircuitBreaker("L2", max_failures=2, reset_timeout=10.0, clock=clock)
    r = ResilientLayer(mc, breaker=breaker)  # slow-call threshold: pool + connect + timeout
    try:
        assert r.timeout == pytest.approx(0.65)
        assert r.get("k") is MISSING
        r.set("k", {"v": 1}, ttl=60)
        assert r.get("k") == {"v": 1}
        for _ in range(3):
            with pytest.raises(InvalidValueError):
                r.set("big", "x" * (2 * 1024 * 1024))
            with pytest.raises(InvalidKeyError):
                r.get(123)  # type: ignore[arg-type]
        assert r.stats().consecutive_failures == 0

        own_memcached.stop()
        for _ in range(2):
            with pytest.raises(LayerUnavailableError) as info:
                r.get("k")
            assert not isinstance(info.value, CircuitOpenError)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            r.get("k")  # refused: no connection attempted
        with pytest.raises(CircuitOpenError):
            r.set("k", 2)
        assert r.rejected == 2

        own_memcached.start()
        with pytest.raises(CircuitOpenError):
            r.get("k")  # still open: the injected clock has not moved
        clock.advance(10.0)
        assert r.get("k") is MISSING  # the trial: a fresh, empty server answers
        assert breaker.state is CircuitState.CLOSED
        r.set("k", 3)
        assert r.get("k") == 3
    finally:
        r.close()
