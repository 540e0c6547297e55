"""The conformance suites of cachechain.testing, run against every built-in layer and
collector (and the example exporter), and shown to fail a layer or collector that
breaks the contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cachechain_hit_ratio import HitRatioExporter
from prometheus_client import CollectorRegistry

from cachechain import (
    ConfigError,
    FanoutCollector,
    MemcachedLayer,
    MemoryCollector,
    MemoryLayer,
    PrometheusCollector,
)
from cachechain._demo import FaultyLayer
from cachechain._resilience import ResilientLayer
from cachechain.layers import CacheLayer, LayerProxy, SupportsClear, SupportsStats
from cachechain.metrics import NoOpCollector
from cachechain.testing import CacheLayerTests, FakeClock, FakeLayer, MetricsCollectorTests
from tests.support.servers import MemcachedProcess

pytest_plugins = ["pytester"]

# -- layers ----------------------------------------------------------------------------------


class TestMemoryLayer(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return MemoryLayer("L1", clock=clock)


class TestMemoryLayerWithACapAndNoDefault(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return MemoryLayer("L1", default_ttl=None, max_ttl=60.0, clock=clock)


class TestMemoryLayerOnRealTime(CacheLayerTests):
    real_time_ttl = 0.2

    @pytest.fixture()
    def clock(self) -> None:
        return None

    @pytest.fixture()
    def layer(self, clock: None) -> CacheLayer:
        return MemoryLayer("L1")


@pytest.mark.memcached
class TestMemcachedLayer(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock, memcached: MemcachedProcess) -> Iterator[CacheLayer]:
        layer = MemcachedLayer("L2", memcached.address, key_prefix="conformance:", clock=clock)
        yield layer
        layer.close()


@pytest.mark.memcached
class TestMemcachedLayerWithACapAndNoDefault(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock, memcached: MemcachedProcess) -> Iterator[CacheLayer]:
        layer = MemcachedLayer("L2", memcached.address, default_ttl=None, max_ttl=60.0, clock=clock)
        yield layer
        layer.close()


class TestFakeLayer(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return FakeLayer("fake", clock=clock, default_ttl=300.0)


class TestLayerProxy(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return LayerProxy(MemoryLayer("L1", clock=clock))


class TestResilientLayer(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return ResilientLayer(MemoryLayer("L1", clock=clock))


class TestFaultyLayerWithoutAFault(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock: FakeClock) -> CacheLayer:
        return FaultyLayer(MemoryLayer("L2", clock=clock), timeout=0.1)


# -- collectors ------------------------------------------------------------------------------


class TestMemoryCollector(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self) -> MemoryCollector:
        return MemoryCollector()

    def read_figures(self, collector: Any) -> bool:
        collector.snapshot()
        return True


class TestPrometheusCollector(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self) -> Iterator[PrometheusCollector]:
        collector = PrometheusCollector(registry=CollectorRegistry())
        yield collector
        collector.close()

    def read_figures(self, collector: Any) -> bool:
        collector.collect()
        return True


class TestFanoutCollector(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self) -> Iterator[FanoutCollector]:
        collector = FanoutCollector(
            MemoryCollector(), PrometheusCollector(registry=CollectorRegistry())
        )
        yield collector
        collector.close()

    def read_figures(self, collector: Any) -> bool:
        collector.collectors[0].snapshot()
        return True


class TestNoOpCollector(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self) -> NoOpCollector:
        return NoOpCollector()


class TestHitRatioExporter(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self) -> HitRatioExporter:
        return HitRatioExporter(interval=0.0)


# -- the suites catch what breaks the contract ----------------------------------------------

_BROKEN = '''
import pytest
from cachechain import MISSING, MemoryLayer
from cachechain.metrics import MetricsCollector
from cachechain.testing import CacheLayerTests, MetricsCollectorTests


class NoneForMissing(MemoryLayer):
    """Says None for a miss, and set_many returns None."""

    def get(self, key):
        value = super().get(key)
        return None if value is MISSING else value

    def set_many(self, items, ttl=None):
        super().set_many(items, ttl)


class Immortal(MemoryLayer):
    """Ignores every TTL, and keeps the older value of a key whose write it refuses."""

    def set(self, key, value, ttl=None):
        self.effective_ttl(ttl)
        if isinstance(value, (set, complex)):
            raise __import__("cachechain").InvalidValueError("no sets")
        super().set(key, value, None)


class PickyCollector(MetricsCollector):
    def record_error(self, layer, operation, error_type):
        if error_type != "timeout":
            raise KeyError(error_type)


class TestNoneForMissing(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock):
        return NoneForMissing("broken", clock=clock, default_ttl=None)


class TestImmortal(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock):
        return Immortal("broken", clock=clock, default_ttl=None)


class TestSound(CacheLayerTests):
    @pytest.fixture()
    def layer(self, clock):
        return MemoryLayer("sound", clock=clock)


class TestPicky(MetricsCollectorTests):
    @pytest.fixture()
    def collector(self):
        return PickyCollector()


class TestNoFixture(CacheLayerTests):
    pass
'''


def test_the_suites_fail_a_broken_layer_or_collector(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken=_BROKEN)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", "-rfE")
    failed = [
        line.split(" ", 1)[1].split(" - ", 1)[0]
        for line in result.outlines
        if line.startswith(("FAILED ", "ERROR "))
    ]
    broken = {name.split("::", 2)[1] + "::" + name.split("::", 2)[2] for name in failed}
    for expected in (
        "TestNoneForMissing::test_a_miss_is_MISSING",
        "TestNoneForMissing::test_set_many_stores_every_item_and_returns_no_key",
        "TestImmortal::test_get_with_ttl_gives_the_remaining_seconds",
        "TestImmortal::test_an_entry_expires_after_its_ttl",
        "TestImmortal::test_max_ttl_caps_every_ttl",
        "TestImmortal::test_a_refused_value_raises_InvalidValueError_and_leaves_no_older_value",
        "TestPicky::test_every_record_method_takes_its_documented_arguments",
        "TestPicky::test_a_chain_reporting_to_it_meets_no_error",
        "TestNoFixture::test_a_miss_is_MISSING",
    ):
        assert expected in broken, f"{expected} should have failed:\n{result.stdout.str()}"
    assert not any(name.startswith("TestSound::") for name in broken), result.stdout.str()
    assert "must define a `layer` fixture" in result.stdout.str()


def test_a_proxy_forwards_the_contract_and_nothing_else() -> None:
    inner = MemoryLayer("L1", max_ttl=60.0)
    proxy = LayerProxy(inner)
    assert proxy.layer is inner and proxy.name == "L1" and proxy.local is True
    assert proxy.max_ttl == 60.0
    assert isinstance(inner, SupportsStats) and isinstance(inner, SupportsClear)
    assert not isinstance(proxy, SupportsStats) and not isinstance(proxy, SupportsClear)
    assert "LayerProxy" in repr(proxy) and "L1" in repr(proxy)
    with pytest.raises(ConfigError, match="CacheLayer"):
        LayerProxy(object())  # type: ignore[arg-type]


def test_a_fake_layer_raises_its_failure_with_a_fresh_traceback() -> None:
    """One exception instance raised by every call must not carry the frames of every
    earlier raise (it grew by a few frames per call, and kept them alive)."""
    from cachechain.testing import FakeLayer

    fake = FakeLayer("L2")
    fake.fail = RuntimeError("down")
    depths = []
    for _ in range(3):
        try:
            fake.get("k")
        except RuntimeError as exc:
            tb, depth = exc.__traceback__, 0
            while tb is not None:
                depth, tb = depth + 1, tb.tb_next
            depths.append(depth)
    assert depths[0] == depths[1] == depths[2]
