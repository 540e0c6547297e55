"""CacheLayerTests: the contract of :class:`cachechain.layers.CacheLayer`, as pytest tests.

Subclass it in a test module, name the subclass ``Test...`` and give it a ``layer``
fixture (see the class docstring). The suite reads and writes only through the
contract's methods; time passes on the ``clock`` fixture, a
:class:`~cachechain.testing.FakeClock`, unless the subclass says its layer keeps real
time.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, ClassVar

import pytest

from .._errors import CacheError, InvalidKeyError, InvalidValueError
from ..layers._base import MISSING, CacheLayer
from ._fakes import FakeClock
from ._threads import run_together

__all__ = ["CacheLayerTests"]

#: Threads of the concurrency test, and operations each runs.
_THREADS = 8
_ROUNDS = 40


class _Unusual:
    """A value no codec knows (compared by identity)."""

    def __repr__(self) -> str:
        return "<unusual value>"


class CacheLayerTests:
    """The :class:`~cachechain.layers.CacheLayer` contract as pytest tests: misses,
    round trips, TTLs, batch operations, deletes, invalid input, ``close``, threads.

    Subclass it as ``class TestMyLayer(CacheLayerTests)`` and define the fixture
    ``layer(self, clock)``: it returns (or yields, closing it afterwards) a new layer
    that holds nothing under the suite's keys (a fresh one, or one with its own key
    prefix on a shared server), whose TTLs run on ``clock`` (a
    :class:`~cachechain.testing.FakeClock` reading unix time; the suite moves it with
    ``advance``). A layer that cannot take a clock overrides the ``clock`` fixture to
    return ``None``: the TTL tests then wait ``real_time_ttl`` seconds of real time.

    Class attributes tune the suite: :attr:`sample_values` (values every layer must
    give back equal), :attr:`falsy_values`, :attr:`any_str_keys` (``str`` keys every
    layer must keep apart), :attr:`refusable_values` (values a layer may refuse with
    :class:`~cachechain.InvalidValueError`) and :attr:`real_time_ttl`. Override
    a test to change it, or set it to ``None`` to drop it (give the reason in a
    comment).
    """

    #: Values every layer must store and give back equal (JSON-compatible).
    sample_values: ClassVar[tuple[Any, ...]] = (
        "text",
        "ünïcødé ✓ 鍵",
        17,
        -(2**40),
        3.25,
        True,
        [1, "two", 3.5, None],
        {"a": [1, 2], "b": {"c": None, "d": "e"}},
        "x" * 20_000,
    )
    #: Falsy values: each is a hit once stored, never a miss.
    falsy_values: ClassVar[tuple[Any, ...]] = (0, "", False, None, [], {}, 0.0)
    #: ``str`` keys every layer must store, each apart from every other.
    any_str_keys: ClassVar[tuple[str, ...]] = (
        "plain",
        "Plain",
        "",
        " ",
        "with space",
        "tab\there",
        "new\nline",
        "cr\rlf\r\n",
        "nul\x00byte",
        "ünïcødé",
        "鍵/ключ",
        "~tilde",
        "colon:key",
        "k" * 250,
        "k" * 251,
        "k" * 2_000,
    )
    #: Values a layer may refuse (InvalidValueError); if it stores one, it gives it back.
    refusable_values: ClassVar[tuple[Any, ...]] = (_Unusual(), {1, 2, 3}, b"\x00\xffbytes", 1j)
    #: The TTL (seconds) the TTL tests use when the ``clock`` fixture is None.
    real_time_ttl: ClassVar[float] = 0.5

    # -- fixtures a subclass provides ---------------------------------------------------

    @pytest.fixture()
    def clock(self) -> FakeClock | None:
        """The clock the layer's TTLs run on: a :class:`FakeClock` at the current unix
        time. Override to return ``None`` for a layer that keeps real time."""
        return FakeClock(start=time.time())

    @pytest.fixture()
    def layer(self, clock: FakeClock | None) -> CacheLayer:
        """The layer under test: override this fixture in the subclass."""
        raise pytest.UsageError(
            f"{type(self).__name__} must define a `layer` fixture returning the layer under "
            "test (see cachechain.testing.CacheLayerTests)"
        )

    # -- helpers --------------------------------------------------------------------------

    def _ttl(self, layer: CacheLayer, clock: FakeClock | None) -> float:
        ttl = 100.0 if clock is not None else self.real_time_ttl
        cap = layer.max_ttl
        return ttl if cap is None or ttl < cap else cap / 2

    def _elapse(self, clock: FakeClock | None, seconds: float) -> None:
        if clock is not None:
            clock.advance(seconds)
            return
        deadline = time.monotonic() + seconds
        waiter = threading.Event()
        while (left := deadline - time.monotonic()) > 0:
            waiter.wait(left)  # real time must pass: the layer cannot take a clock

    @staticmethod
    def _tolerance(clock: FakeClock | None, ttl: float) -> float:
        return 1e-3 * ttl if clock is not None else 0.2 * ttl

    # -- the layer's attributes ----------------------------------------------------------

    def test_it_is_a_cache_layer(self, layer: CacheLayer) -> None:
        assert isinstance(layer, CacheLayer)

    def test_name_local_and_max_ttl(self, layer: CacheLayer) -> None:
        assert isinstance(layer.name, str) and layer.name
        assert isinstance(layer.local, bool)
        cap = layer.max_ttl
        assert cap is None or (
            isinstance(cap, (int, float)) and not isinstance(cap, bool) and 0 < cap < math.inf
        ), f"max_ttl must be None or seconds > 0, got {cap!r}"

    # -- reads and writes -----------------------------------------------------------------

    def test_a_miss_is_MISSING(self, layer: CacheLayer) -> None:
        assert layer.get("absent") is MISSING
        value, ttl = layer.get_with_ttl("absent")
        assert value is MISSING and ttl is None
        assert layer.get_many(["absent", "also-absent"]) == {}
        assert layer.get_many_with_ttl(["absent", "also-absent"]) == {}

    def test_a_stored_value_is_given_back(self, layer: CacheLayer) -> None:
        for i, value in enumerate(self.sample_values):
            layer.set(f"value:{i}", value)
        for i, value in enumerate(self.sample_values):
            assert layer.get(f"value:{i}") == value
            got, ttl = layer.get_with_ttl(f"value:{i}")
            assert got == value
            assert ttl is None or ttl > 0

    def test_a_falsy_value_is_a_hit(self, layer: CacheLayer) -> None:
        for i, value in enumerate(self.falsy_values):
            layer.set(f"falsy:{i}", value)
        for i, value in enumerate(self.falsy_values):
            got = layer.get(f"falsy:{i}")
            assert got is not MISSING, f"{value!r} was stored but reads as a miss"
            assert got == value
            assert layer.get_with_ttl(f"falsy:{i}")[0] == value
        found = layer.get_many([f"falsy:{i}" for i in range(len(self.falsy_values))])
        assert found == {f"falsy:{i}": v for i, v in enumerate(self.falsy_values)}

    def test_a_set_replaces_the_value(self, layer: CacheLayer) -> None:
        layer.set("k", "first")
        layer.set("k", "second")
        assert layer.get("k") == "second"

    def test_any_str_is_a_key_of_its_own(self, layer: CacheLayer) -> None:
        keys = self.any_str_keys
        for i, key in enumerate(keys):
            layer.set(key, i)
        for i, key in enumerate(keys):
            assert layer.get(key) == i, f"key {key!r}"
        assert layer.get_many(list(keys)) == {key: i for i, key in enumerate(keys)}
        layer.delete(keys[0])
        assert layer.get(keys[0]) is MISSING
        assert all(layer.get(key) == i for i, key in enumerate(keys) if i)

    def test_a_non_str_key_raises_InvalidKeyError_if_anything(self, layer: CacheLayer) -> None:
        for key in (1, 2.5, b"bytes", None, ("tuple",)):
            for op, args in (
                ("get", (key,)),
                ("get_with_ttl", (key,)),
                ("set", (key, "v")),
                ("delete", (key,)),
            ):
                with contextlib.suppress(InvalidKeyError):
                    getattr(layer, op)(*args)

    # -- TTLs -----------------------------------------------------------------------------

    def test_get_with_ttl_gives_the_remaining_seconds(
        self, layer: CacheLayer, clock: FakeClock | None
    ) -> None:
        ttl = self._ttl(layer, clock)
        tol = self._tolerance(clock, ttl)
        layer.set("k", "v", ttl)
        value, remaining = layer.get_with_ttl("k")
        assert value == "v"
        assert remaining is not None and ttl - tol <= remaining <= ttl + 1e-6
        self._elapse(clock, 0.4 * ttl)
        value, remaining = layer.get_with_ttl("k")
        assert value == "v"
        assert remaining is not None and remaining <= 0.6 * ttl + 1e-6
        if clock is not None:
            assert remaining >= 0.6 * ttl - tol

    def test_an_entry_expires_after_its_ttl(
        self, layer: CacheLayer, clock: FakeClock | None
    ) -> None:
        ttl = self._ttl(layer, clock)
        layer.set("k", "v", ttl)
        if clock is not None:
            self._elapse(clock, 0.99 * ttl)
            assert layer.get("k") == "v"
            self._elapse(clock, 0.02 * ttl)
        else:
            self._elapse(clock, 1.2 * ttl)
        assert layer.get("k") is MISSING
        value, remaining = layer.get_with_ttl("k")
        assert value is MISSING and remaining is None
        assert layer.get_many(["k"]) == {}
        assert layer.get_many_with_ttl(["k"]) == {}

    def test_no_ttl_means_the_layer_default(
        self, layer: CacheLayer, clock: FakeClock | None
    ) -> None:
        layer.set("k", "v")
        value, remaining = layer.get_with_ttl("k")
        assert value == "v"
        if not hasattr(layer, "default_ttl"):  # not a BaseLayer: its default is its own
            assert remaining is None or remaining > 0
            return
        default: float | None = layer.default_ttl
        cap = layer.max_ttl
        if default is None:  # no expiry (a layer may cap it at max_ttl)
            assert remaining is None or (cap is not None and 0 < remaining <= cap + 1e-6)
            return
        expected = default if cap is None else min(default, cap)
        assert remaining is not None
        assert expected - self._tolerance(clock, expected) <= remaining <= expected + 1e-6

    def test_max_ttl_caps_every_ttl(self, layer: CacheLayer, clock: FakeClock | None) -> None:
        cap = layer.max_ttl
        long = 86_400.0 if cap is None else 4 * cap
        layer.set("k", "v", long)
        layer.set_many({"m": "v"}, long)
        for key in ("k", "m"):
            value, remaining = layer.get_with_ttl(key)
            assert value == "v"
            assert remaining is not None
            assert remaining <= (long if cap is None else cap) + 1e-6
            assert remaining >= 0.5 * (long if cap is None else cap)
        if cap is not None and clock is not None:
            self._elapse(clock, 1.01 * cap)
            assert layer.get("k") is MISSING and layer.get("m") is MISSING

    def test_an_invalid_ttl_raises_InvalidValueError(self, layer: CacheLayer) -> None:
        bad_ttls: tuple[Any, ...] = (0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "10", True)
        for bad in bad_ttls:
            with pytest.raises(InvalidValueError):
                layer.set("k", "v", bad)
            with pytest.raises(InvalidValueError):
                layer.set_many({"k": "v"}, bad)

    # -- batches --------------------------------------------------------------------------

    def test_get_many_gives_only_the_hits(self, layer: CacheLayer, clock: FakeClock | None) -> None:
        ttl = self._ttl(layer, clock)
        layer.set("a", 1, ttl)
        layer.set("b", [2], ttl)
        assert layer.get_many(["a", "b", "c"]) == {"a": 1, "b": [2]}
        assert layer.get_many(("c", "a")) == {"a": 1}
        assert layer.get_many([]) == {}
        found = layer.get_many_with_ttl(["a", "b", "c"])
        assert set(found) == {"a", "b"}
        assert found["a"][0] == 1 and found["b"][0] == [2]
        for _, remaining in found.values():
            assert remaining is not None and 0 < remaining <= ttl + 1e-6
        assert layer.get_many_with_ttl([]) == {}

    def test_set_many_stores_every_item_and_returns_no_key(
        self, layer: CacheLayer, clock: FakeClock | None
    ) -> None:
        ttl = self._ttl(layer, clock)
        items = {f"item:{i}": value for i, value in enumerate(self.sample_values)}
        rejected = layer.set_many(items, ttl)
        assert isinstance(rejected, list) and rejected == []
        assert layer.get_many(list(items)) == items
        assert layer.set_many({}) == []
        assert layer.set_many({"no-ttl": "v"}) == []
        assert layer.get("no-ttl") == "v"
        self._elapse(clock, 1.2 * ttl)
        assert layer.get_many(list(items)) == {}

    def test_delete_removes_a_key_and_an_absent_key_is_fine(self, layer: CacheLayer) -> None:
        layer.set("k", "v")
        layer.set("other", "w")
        layer.delete("k")
        assert layer.get("k") is MISSING
        assert layer.get_with_ttl("k")[0] is MISSING
        assert layer.get("other") == "w"
        layer.delete("k")
        layer.delete("never-set")
        layer.set("k", "again")
        assert layer.get("k") == "again"

    def test_delete_many_removes_every_key(self, layer: CacheLayer) -> None:
        layer.set_many({"a": 1, "b": 2, "c": 3, "d": 4})
        layer.delete_many(["a", "b", "absent"])
        assert layer.get_many(["a", "b", "c", "d"]) == {"c": 3, "d": 4}
        layer.delete_many(key for key in ("c",))  # any iterable
        layer.delete_many([])
        assert layer.get_many(["a", "b", "c", "d"]) == {"d": 4}

    # -- values a layer may refuse --------------------------------------------------------

    def test_a_refused_value_raises_InvalidValueError_and_leaves_no_older_value(
        self, layer: CacheLayer
    ) -> None:
        for i, value in enumerate(self.refusable_values):
            key = f"odd:{i}"
            layer.set(key, "older")
            try:
                layer.set(key, value)
            except InvalidValueError:
                assert layer.get(key) is MISSING, "a refused write left the older value"
            else:
                assert layer.get(key) == value

    def test_set_many_returns_the_keys_it_refused(self, layer: CacheLayer) -> None:
        for i, value in enumerate(self.refusable_values):
            key = f"odd:{i}"
            layer.set(key, "older")
            rejected = layer.set_many({"fine": i, key: value})
            assert isinstance(rejected, list) and set(rejected) <= {key}
            assert layer.get("fine") == i
            if rejected:
                assert layer.get(key) is MISSING, "a refused write left the older value"
            else:
                assert layer.get(key) == value

    # -- lifecycle and threads ------------------------------------------------------------

    def test_close_is_idempotent(self, layer: CacheLayer) -> None:
        layer.set("k", "v")
        layer.close()
        layer.close()
        with contextlib.suppress(CacheError):  # a closed layer may work on, or raise this
            layer.get("k")

    def test_threads_share_a_layer(self, layer: CacheLayer) -> None:
        def work(n: int) -> None:
            for i in range(_ROUNDS):
                key = f"t{n}:{i % 5}"
                layer.set(key, [n, i])
                assert layer.get(key) == [n, i]
                if i % 3 == 0:
                    layer.delete(key)
                    assert layer.get(key) is MISSING

        run_together(work, _THREADS)
