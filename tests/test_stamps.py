"""Stamped entries (fail-safe copies) in the layers, the envelope and the settings.

A stamped entry is kept ``ttl + fail_safe_max_age`` seconds and fresh for ``ttl``:
every ordinary read treats it as absent past ``ttl``; only the stamp reading mode
(``get_or_load`` with fail-safe) sees it. In memcached the physical TTL is memcached's
own exptime and the logical expiry a header field, bound by a signing codec.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from pymemcache.client.base import Client

from cachechain import (
    MISSING,
    Chain,
    ConfigError,
    CorruptValueError,
    JsonCodec,
    MemcachedLayer,
    MemoryLayer,
    SignedPickleCodec,
    chain_config_from_mapping,
)
from cachechain._codecs import (
    ENVELOPE_HEADER_SIZE,
    ENVELOPE_MAGIC,
    STAMPED_HEADER_SIZE,
    STAMPED_MAGIC,
    Envelope,
    expiry_of,
    restamp,
)
from cachechain._config import ChainConfig, LoadConfig
from cachechain.layers._stamps import Found, Stamped, reading, stamps_wanted
from cachechain.testing import FakeClock
from tests.support.servers import MemcachedProcess

START = 1_700_000_000.0
SECRET = b"stamps-secret"


# -- MemoryLayer --------------------------------------------------------------------------


def test_a_stamped_memory_entry_is_fresh_then_kept_then_gone() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock)
    layer.set("k", Stamped("v", 10.0, 10.0), 100.0)
    assert layer.get("k") == "v"
    assert layer.get_with_ttl("k") == ("v", 10.0)  # the logical TTL
    assert layer.get_fresh("k") == ("v", 10.0, 10.0)
    clock.advance(30)
    assert layer.get("k") is MISSING
    assert layer.get_with_ttl("k") == (MISSING, None)
    assert layer.get_many_with_ttl(["k"]) == {}
    assert layer.expire() == 0  # kept: within its physical TTL
    assert layer.get_fresh("k") == (MISSING, None, None)
    assert len(layer) == 1
    with reading:
        found, physical = layer.get_with_ttl("k")
    assert isinstance(found, Found)
    assert (found.value, found.fresh_left, found.origin, physical) == ("v", -20.0, 10.0, 70.0)
    assert not stamps_wanted()
    clock.advance(70)
    with reading:
        assert layer.get_with_ttl("k") == (MISSING, None)
    assert layer.get_fresh("k") == (MISSING, None, None)
    assert len(layer) == 0  # dropped at its physical expiry


def test_expire_removes_stamped_entries_at_their_physical_expiry() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock)
    layer.set_many({"a": Stamped("v", 1.0, 1.0), "b": "plain"}, 5.0)
    clock.advance(2)
    assert layer.get("a") is MISSING
    assert layer.expire() == 0
    clock.advance(4)
    assert layer.expire() == 2


def test_the_physical_ttl_is_capped_and_the_logical_one_with_it() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock, max_ttl=5.0)
    layer.set("k", Stamped("v", 30.0, 30.0), 3630.0)
    assert layer.get_fresh("k") == ("v", 5.0, 30.0)
    clock.advance(5)
    assert len(layer) == 1
    assert layer.get_fresh("k") == (MISSING, None, None)
    assert len(layer) == 0


def test_atomic_operations_see_a_stale_copy_as_absent() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock)
    layer.set("n", Stamped(5, 1.0, 1.0), 100.0)
    clock.advance(2)
    assert layer.incr("n") is None
    assert not layer.touch("n", 10.0)
    assert layer.add("n", 7, 10.0)
    assert layer.get("n") == 7


# -- the envelope -------------------------------------------------------------------------


def test_a_stamped_envelope_carries_both_expiries_and_the_ttl() -> None:
    envelope = Envelope(JsonCodec())
    data = envelope.pack([1], START + 3610, b"k", fresh_until=START + 10, ttl=10.0)
    assert len(data) == STAMPED_HEADER_SIZE + 3 == 29
    assert data[0] == STAMPED_MAGIC == 0xC2
    assert struct.unpack(">ddd", data[2:26]) == (START + 3610, START + 10, 10.0)
    assert envelope.unpack(data, b"k") == ([1], START + 10)  # readers see the logical one
    assert envelope.read(data, b"k") == ([1], START + 3610, START + 10, 10.0)
    assert expiry_of(data) == START + 10
    plain, old = restamp(data, START + 60)  # a touch: fresh until then, not stamped
    assert old == START + 10
    assert plain[0] == ENVELOPE_MAGIC
    assert len(plain) == ENVELOPE_HEADER_SIZE + 3
    assert envelope.read(plain) == ([1], START + 60, START + 60, None)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_stamped_header_with_an_invalid_stamp_is_corrupt(bad: float) -> None:
    envelope = Envelope(JsonCodec())
    data = envelope.pack(1, START + 100, fresh_until=START + 10, ttl=10.0)
    for offset in (10, 18):
        forged = data[:offset] + struct.pack(">d", bad) + data[offset + 8 :]
        with pytest.raises(CorruptValueError, match="invalid stamp"):
            envelope.unpack(forged)
    with pytest.raises(CorruptValueError, match="truncated"):
        envelope.unpack(data[:20])


def test_a_signing_codec_binds_the_logical_expiry() -> None:
    envelope = Envelope(SignedPickleCodec(SECRET))
    data = envelope.pack({"v": 1}, START + 3610, b"k", fresh_until=START + 10, ttl=10.0)
    assert envelope.unpack(data, b"k") == ({"v": 1}, START + 10)
    fresher = data[:10] + struct.pack(">d", START + 3600) + data[18:]  # fresh again?
    with pytest.raises(CorruptValueError, match="signature"):
        envelope.unpack(fresher, b"k")
    restamped, old = envelope.restamp(data, START + 60, b"k")  # verified, signed again
    assert old == START + 10
    assert envelope.unpack(restamped, b"k") == ({"v": 1}, START + 60)


# -- memcached ----------------------------------------------------------------------------


@pytest.fixture()
def raw(memcached: MemcachedProcess) -> Iterator[Client]:
    client = Client(("127.0.0.1", memcached.port), default_noreply=False, timeout=2)
    yield client
    client.close()


def layer_on(server: MemcachedProcess, wall: FakeClock, **kwargs: object) -> MemcachedLayer:
    return MemcachedLayer("L2", server.address, timeout=2, connect_timeout=2, clock=wall, **kwargs)  # type: ignore[arg-type]


@pytest.mark.memcached
@pytest.mark.parametrize("codec", [JsonCodec(), SignedPickleCodec(SECRET)], ids=["json", "signed"])
def test_memcached_keeps_a_fail_safe_copy_for_ttl_plus_max_age(
    memcached: MemcachedProcess, codec: object
) -> None:
    wall, mono = FakeClock(START), FakeClock()
    config = LoadConfig(fail_safe=True, fail_safe_max_age=600.0)
    chain = Chain(
        [MemoryLayer("L1", clock=mono), layer_on(memcached, wall, codec=codec)],
        load=config,
        clock=mono,
        coherence=False,
    )
    chain.get_or_load("k", lambda: "v1", ttl=10)
    assert chain.flush(5)
    ttl_line = memcached.raw(b"mg k t\r\n")
    assert ttl_line.startswith(b"HD t")
    assert 600 < int(ttl_line.split(b"t")[1].split()[0]) <= 610  # memcached's own TTL
    other = layer_on(memcached, wall, codec=codec)  # another process
    assert other.get_with_ttl("k") == ("v1", 10.0)
    wall.advance(11)
    assert other.get("k") is MISSING
    assert other.get_many(["k"]) == {}
    with reading:
        found, physical = other.get_with_ttl("k")
    assert (found.value, found.fresh_left, found.origin) == ("v1", -1.0, 10.0)
    assert physical == pytest.approx(599.0)
    fresh_process = Chain(
        [MemoryLayer("L1", clock=mono), other], load=config, clock=mono, coherence=False
    )

    def down() -> str:
        raise ConnectionError("down")

    assert fresh_process.get_or_load("k", down, ttl=10) == "v1"
    assert fresh_process.get("k") is None
    chain.close()
    fresh_process.close()


@pytest.mark.memcached
def test_memcached_atomic_operations_see_a_stale_copy_as_absent(
    memcached: MemcachedProcess,
) -> None:
    wall = FakeClock(START)
    layer = layer_on(memcached, wall)
    layer.set("a", Stamped("old", 5.0, 5.0), 100)
    layer.set("t", Stamped("old", 5.0, 5.0), 100)
    wall.advance(6)
    assert not layer.touch("t", 50)
    assert layer.add("a", "new", 50)
    assert layer.get("a") == "new"
    layer.set("f", Stamped("v", 5.0, 5.0), 100)
    assert layer.touch("f", 50)  # a fresh one: re-timed, no longer stamped
    with reading:
        assert layer.get_with_ttl("f") == ("v", 50.0)
    layer.close()


@pytest.mark.memcached
def test_a_write_behind_check_takes_stamped_values(memcached: MemcachedProcess) -> None:
    layer = layer_on(memcached, FakeClock(START), max_value_size=40)
    layer.check_value(Stamped("x", 1.0, 1.0))
    with pytest.raises(Exception, match="max_value_size"):
        layer.check_value(Stamped("x" * 20, 1.0, 1.0))  # the stamped header counts
    layer.close()


# -- configuration ------------------------------------------------------------------------


def test_the_settings_mapping_takes_load() -> None:
    config = chain_config_from_mapping(
        {
            "layers": [{"type": "memory"}],
            "metrics": "none",
            "load": {"fail_safe": True, "soft_timeout": 0.1, "eager_refresh": 0.8},
        }
    )
    assert config.load == LoadConfig(fail_safe=True, soft_timeout=0.1, eager_refresh=0.8)
    with Chain.from_config(config) as chain:
        assert chain._loads.policies.default is not None
    default = chain_config_from_mapping({"layers": [{"type": "memory"}], "metrics": "none"})
    assert default.load == LoadConfig() == ChainConfig(layers=[MemoryLayer()]).load


@pytest.mark.parametrize(
    ("load", "message"),
    [
        ({"soft_timeout": -1}, "load.soft_timeout must be a finite number of seconds >= 0"),
        ({"hard_timeout": "2"}, "load.hard_timeout must be a number of seconds"),
        ({"eager_refresh": 1.5}, "load.eager_refresh must be a number in (0, 1)"),
        ({"fail_safe": "yes"}, "load.fail_safe must be a bool"),
        ({"fail_safe_max_age": float("inf")}, "load.fail_safe_max_age must be a finite"),
        ({"fail_safe_throttle": -1}, "load.fail_safe_throttle must be a finite"),
        ({"max_background_loads": 0}, "load.max_background_loads must be an int > 0"),
        ({"soft": 1}, "load.soft is not a load setting"),
        ("on", "load must be a mapping of load settings"),
    ],
)
def test_bad_load_settings_name_their_field(load: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        chain_config_from_mapping({"layers": [{"type": "memory"}], "load": load})
    assert message in str(info.value)


def test_no_stamp_leaks_into_a_plain_read_after_a_failed_read() -> None:
    """The reading mode ends even when a layer raises inside it."""

    class Failing(MemoryLayer):
        def get_with_ttl(self, key: str) -> tuple[object, float | None]:
            raise ConnectionError("down")

    clock = FakeClock()
    chain = Chain(
        [MemoryLayer("L1", clock=clock), Failing("L2", clock=clock)],
        load=LoadConfig(fail_safe=True),
        clock=clock,
    )
    assert chain.get_or_load("k", lambda: "v", ttl=1) == "v"
    assert not stamps_wanted()
    chain.close()


@pytest.mark.memcached
def test_fail_safe_across_processes_with_coherence_on(memcached: MemcachedProcess) -> None:
    """The default chain (namespaced keys, the journal): another process falls back on
    the copy in memcached; a set there still replaces it for everybody."""
    wall, mono = FakeClock(START), FakeClock()
    config = LoadConfig(fail_safe=True)

    def process() -> Chain:
        return Chain(
            [MemoryLayer("L1", clock=mono), layer_on(memcached, wall)], load=config, clock=mono
        )

    first, second = process(), process()
    first.get_or_load("k", lambda: "v1", ttl=10)
    assert first.flush(5)
    wall.advance(11)
    mono.advance(11)

    def down() -> str:
        raise ConnectionError("down")

    assert second.get("k") is None
    assert second.get_or_load("k", down, ttl=10) == "v1"
    first.set("k", "set", ttl=10)  # synchronous in memcached: replaces the copy
    assert second.get("k") == "set"
    assert second.get_or_load("k", down, ttl=10) == "set"
    first.close()
    second.close()
