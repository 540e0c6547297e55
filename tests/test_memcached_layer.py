"""Tests of MemcachedLayer against real memcached servers (fakes only to inject faults)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

import cachechain.layers._pool as poolmod
from cachechain import _fork
from cachechain._codecs import (
    ENVELOPE_MAGIC,
    CorruptValueError,
    JsonCodec,
    SignedPickleCodec,
    pack,
)
from cachechain._errors import (
    ChainClosedError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
    trips_breaker,
)
from cachechain.layers import SupportsClear, SupportsStats, SupportsTimeout, _wire
from cachechain.layers._base import MISSING
from cachechain.layers._memcached import (
    MemcachedLayer,
    MemcachedLayerStats,
    NodeDownError,
    memcached_key,
)
from cachechain.layers._wire import Connection
from tests.support.fakes import UNPICKLED, Boom, FakeClock
from tests.support.hostile import Close, HostileServer, Reply, Request, Send
from tests.support.servers import MemcachedProcess, free_port, just_stored, ttl_as_stored

pytestmark = pytest.mark.memcached

SECRET = b"layer-test-secret"
THIRTY_DAYS = 30 * 24 * 3600


def raw_client(server: MemcachedProcess) -> Client:
    """A plain pymemcache client: raw bytes, waits for replies."""
    return Client(("127.0.0.1", server.port), default_noreply=False, timeout=2, connect_timeout=2)


def make_layer(server: MemcachedProcess, **kwargs: Any) -> MemcachedLayer:
    kwargs.setdefault("timeout", 0.5)
    kwargs.setdefault("connect_timeout", 0.5)
    return MemcachedLayer("L2", server.address, **kwargs)


@pytest.fixture()
def layer(memcached: MemcachedProcess) -> Iterator[MemcachedLayer]:
    lay = make_layer(memcached)
    yield lay
    lay.close()


def _journal_traffic(args: tuple[Any, ...]) -> bool:
    """Whether a command's first argument (a key, or a batch of keys) names a coherence
    journal's reserved keys: another chain's poller, not the layer under test."""
    first = args[0] if args else None
    keys = [first] if isinstance(first, bytes) else first
    if not isinstance(keys, (list, tuple, dict)):
        return False  # flush_all's deadline, say
    return any(isinstance(k, bytes) and k.startswith(b"__cachechain__/") for k in keys)


class CallSpy:
    """Records the memcached round trips of the layer's connections: ``(command,
    (host, port))`` for each call of a ``Connection`` command or of ``_wire.get``
    (a coherence journal's polls and publications, from any chain of the process,
    are left out)."""

    COMMANDS = (
        "get_many",
        "gets",
        "set",
        "set_many",
        "add",
        "cas",
        "delete",
        "delete_many",
        "incr",
        "decr",
        "touch",
        "flush_all",
    )

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any]] = []
        for name in self.COMMANDS:
            original = getattr(Connection, name)
            monkeypatch.setattr(Connection, name, self._wrap(name, original))
        monkeypatch.setattr(_wire, "get", self._wrap("get", _wire.get))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def spy(client: Connection, *args: Any, **kwargs: Any) -> Any:
            if not _journal_traffic(args):
                self.calls.append((name, client.server))
            return original(client, *args, **kwargs)

        return spy


class FaultServer:
    """A TCP listener on loopback that misbehaves: ``mode`` is "blackhole" (never
    accepts, so requests time out), "close" (accepts and closes), or a canned reply."""

    def __init__(self, mode: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.mode = mode
        self.thread: threading.Thread | None = None
        if mode != "blackhole":
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the listener was shut down
                return
            with conn:
                if self.mode == "close":
                    continue
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    if conn.recv(65536):
                        assert isinstance(self.mode, bytes)
                        conn.sendall(self.mode)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept on Linux
        self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=5)
            assert not self.thread.is_alive()


@pytest.fixture()
def fault_server() -> Iterator[Callable[[str | bytes], FaultServer]]:
    servers: list[FaultServer] = []

    def make(mode: str | bytes) -> FaultServer:
        server = FaultServer(mode)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# -- configuration -----------------------------------------------------------------------


def test_capabilities_stats_timeout_and_clear() -> None:
    lay = MemcachedLayer()
    assert isinstance(lay, SupportsStats)
    assert isinstance(lay, SupportsTimeout)
    # clear() is memcached's flush_all: a chain calls it only for clear(flush=True).
    assert isinstance(lay, SupportsClear)


def test_defaults_and_read_only_settings() -> None:
    lay = MemcachedLayer()
    assert lay.name == "L2"
    assert lay.local is False
    assert lay.servers == ("127.0.0.1:11211",)
    assert lay.timeout == 0.25
    assert lay.connect_timeout == 0.25
    assert lay.default_ttl == 300.0
    assert lay.max_ttl is None
    assert isinstance(lay.codec, JsonCodec)
    assert lay.key_prefix == ""
    assert "L2" in repr(lay)
    with pytest.raises(AttributeError):
        lay.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        lay.connect_timeout = 1.0  # type: ignore[misc]
    assert lay.stats() == MemcachedLayerStats(
        corrupt_values=0, nodes=1, nodes_down=0, connections_open=0, pool_exhausted=0
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.stats().nodes = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ("cache1:11311", ("cache1:11311",)),
        ("cache1", ("cache1:11211",)),
        ("[::1]:11311", ("[::1]:11311",)),
        ("[::1]", ("[::1]:11211",)),
        ("a:1, b:2", ("a:1", "b:2")),
        (["a:1", "[fe80::1]:2", "10.0.0.1:3"], ("a:1", "[fe80::1]:2", "10.0.0.1:3")),
        (("a:1",), ("a:1",)),
    ],
)
def test_server_parsing(servers: Any, expected: tuple[str, ...]) -> None:
    assert MemcachedLayer(servers=servers).servers == expected


@pytest.mark.parametrize(
    "servers",
    [
        "",
        [],
        "a:",
        "a:0",
        "a:65536",
        "a:x",
        ":11211",
        "::1:11211",
        "::1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[]:11211",
        "unix:/tmp/mc.sock",
        "a b:1",
        "a:1,a:1",
        ["a:1", "a:1"],
        [1],
        b"a:1",
        {"a:1"},
        42,
        "a:1,",
    ],
)
def test_bad_servers_are_config_errors(servers: Any) -> None:
    with pytest.raises(ConfigError, match="servers"):
        MemcachedLayer(servers=servers)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key_prefix": "~p"}, "key_prefix"),
        ({"key_prefix": "a b"}, "key_prefix"),
        ({"key_prefix": "é"}, "key_prefix"),
        ({"key_prefix": "p\n"}, "key_prefix"),
        ({"key_prefix": "x" * 65}, "key_prefix"),
        ({"key_prefix": b"p"}, "key_prefix"),
        ({"codec": object()}, "codec"),
        ({"codec": type("C", (), {"codec_id": 300, "encode": 1, "decode": 1})()}, "codec_id"),
        ({"codec": type("C", (), {"codec_id": True, "encode": 1, "decode": 1})()}, "codec_id"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"connect_timeout": None}, "connect_timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": 2.0}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"pool_timeout": -0.1}, "pool_timeout"),
        ({"dead_timeout": 0}, "dead_timeout"),
        ({"max_value_size": 0}, "max_value_size"),
        ({"default_ttl": -5}, "default_ttl"),
        ({"max_ttl": 0}, "max_ttl"),
        ({"clock": 1.0}, "clock"),
        ({"monotonic": None}, "monotonic"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MemcachedLayer(servers="127.0.0.1:11211", **kwargs)


def test_zero_pool_timeout_and_longest_prefix_are_accepted() -> None:
    lay = MemcachedLayer(pool_timeout=0, key_prefix="p" * 64)
    assert lay.key_prefix == "p" * 64


def test_bad_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="name"):
        MemcachedLayer("")


# -- key mapping -------------------------------------------------------------------------


def hashed(key: str, prefix: str = "") -> bytes:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return (prefix + "~").encode() + base64.urlsafe_b64encode(digest).rstrip(b"=")


@pytest.mark.parametrize(
    "key",
    ["abc", "user:42", "!", "}~", "a~b", "x" * 250, "path/to?q=1&x=%20"],
)
def test_safe_keys_are_sent_raw(key: str) -> None:
    assert memcached_key(key) == key.encode()


@pytest.mark.parametrize(
    "key",
    [
        "",
        " ",
        "a b",
        "a\r\nflush_all",
        "tab\t",
        "nul\x00",
        "ctl\x01",
        "del\x7f",
        "é",
        "😀",
        "~abc",
        "~",
        "x" * 251,
        "\ud800",
    ],
)
def test_unsafe_keys_are_hashed(key: str) -> None:
    assert memcached_key(key) == hashed(key)
    assert memcached_key(key, "ns:") == hashed(key, "ns:")
    assert len(hashed(key)) == 44


def test_prefix_counts_toward_the_raw_length_limit() -> None:
    assert memcached_key("x" * 247, "ns:") == b"ns:" + b"x" * 247
    assert memcached_key("x" * 248, "ns:") == hashed("x" * 248, "ns:")
    assert memcached_key("a", "") == b"a"


@pytest.mark.parametrize("key", [b"bytes", 1, None, ("t",)])
def test_non_str_key_is_invalid(key: Any) -> None:
    with pytest.raises(InvalidKeyError):
        memcached_key(key)


@pytest.mark.parametrize("prefix", ["~", "a b", "x" * 65, 5])
def test_memcached_key_checks_the_prefix(prefix: Any) -> None:
    with pytest.raises(ConfigError, match="key_prefix"):
        memcached_key("k", prefix)


def _protocol_safe(mkey: bytes) -> bool:
    return 0 < len(mkey) <= 250 and all(0x21 <= b <= 0x7E for b in mkey)


PREFIXES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=64)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(max_size=300), min_size=2, max_size=10, unique=True),
    PREFIXES.filter(lambda p: not p.startswith("~")),
)
def test_mapping_is_safe_and_injective(keys: list[str], prefix: str) -> None:
    mapped = [memcached_key(k, prefix) for k in keys]
    assert all(_protocol_safe(m) for m in mapped)
    assert all(m.startswith(prefix.encode()) for m in mapped)
    assert len(set(mapped)) == len(keys)
    assert mapped == [memcached_key(k, prefix) for k in keys]  # stable


_example_counter = iter(range(10**9))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(max_size=300)
        | st.builds(lambda a, b: a + "\r\nflush_all\r\n" + b, st.text(max_size=20), st.text()),
        min_size=1,
        max_size=8,
        unique=True,
    )
)
def test_arbitrary_keys_against_real_memcached(
    memcached_server: MemcachedProcess, keys: list[str]
) -> None:
    """Round trips, no collisions, and injection attempts flush nothing."""
    plain = raw_client(memcached_server)
    plain.set(b"sentinel", b"alive")
    tag = next(_example_counter)
    lay = make_layer(memcached_server)
    try:
        values = {k: [tag, i] for i, k in enumerate(keys)}
        for k in keys[: len(keys) // 2]:
            lay.set(k, values[k], ttl=60)
        assert lay.set_many({k: values[k] for k in keys[len(keys) // 2 :]}, ttl=60) == []
        for k in keys:
            assert lay.get(k) == values[k]
        assert lay.get_many(keys) == values
        lay.delete(keys[0])
        assert lay.get(keys[0]) is MISSING
        lay.delete_many(keys)
        assert lay.get_many(keys) == {}
    finally:
        lay.close()
    assert plain.get(b"sentinel") == b"alive"
    plain.close()


def test_injection_keys_flush_nothing(memcached: MemcachedProcess, layer: MemcachedLayer) -> None:
    plain = raw_client(memcached)
    plain.set(b"sentinel", b"alive")
    evil = [
        "x\r\nflush_all",
        "\r\nflush_all\r\n",
        "a b\r\nflush_all 0\r\nset k 0 0 1\r\n",
        "k\x00flush_all",
        "\nflush_all\n",
    ]
    for k in evil:
        layer.set(k, k)
        assert layer.get(k) == k
    assert layer.get_many(evil) == {k: k for k in evil}
    layer.delete_many(evil)
    assert plain.get(b"sentinel") == b"alive"
    assert plain.get(b"k") is None


def test_keys_are_stored_under_their_mapping(
    memcached: MemcachedProcess, layer: MemcachedLayer
) -> None:
    plain = raw_client(memcached)
    layer.set("a b", 1)
    layer.set("plain", 2)
    assert plain.get(hashed("a b")) is not None
    assert plain.get(b"plain") is not None
    prefixed = make_layer(memcached, key_prefix="ns:")
    prefixed.set("plain", 3)
    assert plain.get(b"ns:plain") is not None
    assert layer.get("plain") == 2
    assert prefixed.get("plain") == 3


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, 0, 1.5, "", "text é", [], {}, [1, [2]], {"a": {"b": None}}],
)
def test_value_round_trip(layer: MemcachedLayer, value: Any) -> None:
    layer.set("k", value)
    assert layer.get("k") == value
    # A stored None is a hit, not a miss.
    assert layer.get_many(["k"]) == {"k": value}


def test_tuple_reads_back_as_list(layer: MemcachedLayer) -> None:
    layer.set("k", (1, (2, 3)))
    assert layer.get("k") == [1, [2, 3]]


def test_all_operations(layer: MemcachedLayer) -> None:
    assert layer.get("missing") is MISSING
    assert layer.get_with_ttl("missing") == (MISSING, None)
    layer.set("a", 1)
    assert layer.set_many({"b": 2, "c": 3}) == []
    assert layer.get_many(["a", "b", "c", "d", "a"]) == {"a": 1, "b": 2, "c": 3}
    assert layer.get_many([]) == {}
    many = layer.get_many_with_ttl(["a", "b", "zz"])
    assert set(many) == {"a", "b"}
    assert many["a"][0] == 1
    assert 299 < many["a"][1] <= 300  # type: ignore[operator]
    layer.delete("a")
    layer.delete("a")  # absent: fine
    assert layer.get("a") is MISSING
    layer.delete_many(["b", "nope"])
    layer.delete_many([])
    assert layer.get_many(["a", "b", "c"]) == {"c": 3}
    assert layer.set_many({}) == []
    layer.set("c", "replaced")
    assert layer.get("c") == "replaced"


def test_keys_as_str_are_refused(layer: MemcachedLayer) -> None:
    with pytest.raises(InvalidKeyError):
        layer.get_many("abc")
    with pytest.raises(InvalidKeyError):
        layer.delete_many("abc")


def test_invalid_keys_are_refused_before_io(fault_server: Any) -> None:
    # A server that never answers: any I/O would time out instead.
    down = MemcachedLayer(servers=fault_server("blackhole").address, timeout=5)
    for call in (
        lambda: down.get(1),  # type: ignore[arg-type]
        lambda: down.get_with_ttl(b"k"),  # type: ignore[arg-type]
        lambda: down.set(None, 1),  # type: ignore[arg-type]
        lambda: down.delete(2),  # type: ignore[arg-type]
        lambda: down.get_many(["ok", 3]),  # type: ignore[list-item]
        lambda: down.set_many({"ok": 1, 4: 2}),  # type: ignore[dict-item]
        lambda: down.delete_many(["ok", b"x"]),  # type: ignore[list-item]
    ):
        start = time.monotonic()
        with pytest.raises(InvalidKeyError) as info:
            call()
        assert time.monotonic() - start < 1
        assert trips_breaker(info.value) is False


# -- TTLs --------------------------------------------------------------------------------


def test_sub_second_ttl_uses_the_envelope(memcached: MemcachedProcess) -> None:
    clock = FakeClock(time.time())
    lay = make_layer(memcached, clock=clock)
    # 2.5 s, not 0.5 s: memcached's clock ticks once a second, so an item stored for
    # 1 s may be gone after a fraction of a second of real time (a flake under load);
    # for 3 s it stays at least 2 s, while the injected clock runs the envelope out.
    # memcached gets whole seconds, rounded up
    assert ttl_as_stored(memcached, lambda: lay.set("k", "v", ttl=2.5), b"k") == 3
    assert lay.get_with_ttl("k") == ("v", 2.5)
    clock.advance(0.2)
    value, remaining = lay.get_with_ttl("k")
    assert value == "v"
    assert remaining == pytest.approx(2.3)
    assert lay.get_many_with_ttl(["k"])["k"][1] == pytest.approx(2.3)
    clock.advance(2.3)
    assert lay.get_with_ttl("k") == (MISSING, None)  # still in memcached, expired for us
    assert lay.get("k") is MISSING
    assert lay.get_many_with_ttl(["k"]) == {}
    assert memcached.ttl(b"k") is not None


def test_ttl_rounding_default_and_cap(memcached: MemcachedProcess) -> None:
    clock = FakeClock(time.time())
    lay = make_layer(memcached, clock=clock, max_ttl=60)
    assert ttl_as_stored(memcached, lambda: lay.set("ten", 1, ttl=9.2), b"ten") == 10
    assert lay.get_with_ttl("ten") == (1, pytest.approx(9.2))
    lay.set("default", 1)
    assert memcached.ttl(b"default") in just_stored(60)  # default 300, capped by max_ttl
    lay.set("capped", 1, ttl=100)
    assert memcached.ttl(b"capped") in just_stored(60)
    assert lay.get_with_ttl("capped") == (1, 60.0)
    lay.set_many({"many": 1}, ttl=7)
    assert memcached.ttl(b"many") in just_stored(7)
    assert lay.get_many_with_ttl(["many"]) == {"many": (1, 7.0)}


def test_no_ttl_never_expires(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached, default_ttl=None)
    lay.set("k", 1)
    assert memcached.ttl(b"k") == -1
    assert lay.get_with_ttl("k") == (1, None)
    assert lay.get_many_with_ttl(["k"]) == {"k": (1, None)}


def test_ttl_over_thirty_days_is_sent_as_absolute_time(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached)  # the real wall clock: memcached compares with its own
    ttl = 40 * 24 * 3600.0
    lay.set("long", "v", ttl=ttl)
    lay.set_many({"long2": "w"}, ttl=ttl)
    # Sent as a relative 3,456,000 s, memcached would read a 1970 date: already expired.
    assert lay.get("long") == "v"
    assert lay.get("long2") == "w"
    remaining = memcached.ttl(b"long")
    assert remaining is not None
    assert ttl - 5 <= remaining <= ttl + 5  # memcached keeps its own, coarse clock
    lay.set("thirty", "v", ttl=THIRTY_DAYS)
    assert memcached.ttl(b"thirty") in just_stored(THIRTY_DAYS)


def test_ttl_beyond_2038_keeps_the_item_and_the_envelope_expiry(
    memcached: MemcachedProcess,
) -> None:
    lay = make_layer(memcached)
    ttl = 200 * 365 * 24 * 3600.0
    lay.set("far", "v", ttl=ttl)
    assert memcached.ttl(b"far") == -1
    value, remaining = lay.get_with_ttl("far")
    assert value == "v"
    assert remaining == pytest.approx(ttl, abs=5)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "10", True])
def test_invalid_ttl(layer: MemcachedLayer, ttl: Any) -> None:
    with pytest.raises(InvalidValueError, match="ttl"):
        layer.set("k", 1, ttl=ttl)
    with pytest.raises(InvalidValueError, match="ttl"):
        layer.set_many({"k": 1}, ttl=ttl)
    assert layer.get("k") is MISSING


# -- values ------------------------------------------------------------------------------


def test_a_two_mib_value_is_never_sent_and_its_old_value_is_deleted(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = make_layer(memcached)
    lay.set("big", "old")
    spy = CallSpy(monkeypatch)
    with pytest.raises(InvalidValueError, match="max_value_size") as info:
        lay.set("big", "x" * (2 * 1024 * 1024))
    assert [name for name, _ in spy.calls] == ["delete_many"]  # the delete; no store
    assert info.value.trips_breaker is False
    assert lay.get("big") is MISSING  # the old value does not outlive the refused write
    lay.set("big", "old")
    assert lay.set_many({"big": "x" * (2 * 1024 * 1024), "small": 1}) == ["big"]
    assert lay.get("big") is MISSING
    assert lay.get("small") == 1


def test_max_value_size_counts_the_encoded_envelope(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached, max_value_size=100)
    lay.set("fits", "x" * 88)  # 10-byte header + 90 bytes of JSON
    with pytest.raises(InvalidValueError, match="101 bytes"):
        lay.set("over", "x" * 89)
    assert lay.get("fits") == "x" * 88
    assert lay.get("over") is MISSING


def test_server_object_too_large_is_invalid_value(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached, max_value_size=4 * 1024 * 1024, timeout=2)
    big = "x" * (2 * 1024 * 1024)
    with pytest.raises(InvalidValueError, match="too large") as info:
        lay.set("big", big)
    assert isinstance(info.value.__cause__, MemcacheServerError)
    assert lay.get("big") is MISSING
    lay.set("after", 1)  # the layer still works
    assert lay.get("after") == 1
    rejected = lay.set_many({"a": 1, "big": big, "c": 3})
    assert rejected == ["big"]
    assert lay.get_many(["a", "big", "c"]) == {"a": 1, "c": 3}


def test_non_json_value_is_invalid(layer: MemcachedLayer) -> None:
    with pytest.raises(InvalidValueError):
        layer.set("k", {1, 2})
    with pytest.raises(InvalidValueError):
        layer.set("k", {1: "int key"})
    assert layer.set_many({"bad": object(), "good": [1]}) == ["bad"]
    assert layer.get_many(["k", "bad", "good"]) == {"good": [1]}


def test_signed_pickle_layer_round_trip(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached, codec=SignedPickleCodec(SECRET))
    lay.set("k", {1, 2})
    lay.set_many({"t": (1, b"x")})
    assert lay.get("k") == {1, 2}
    assert lay.get_many(["k", "t"]) == {"k": {1, 2}, "t": (1, b"x")}


# -- corrupt and tampered bytes ----------------------------------------------------------


def envelope(codec_id: int, payload: bytes, expires_at: float = 0.0) -> bytes:
    return struct.pack(">BBd", ENVELOPE_MAGIC, codec_id, expires_at) + payload


def assert_corrupt(lay: MemcachedLayer, key: str) -> None:
    before = lay.stats().corrupt_values
    with pytest.raises(CorruptValueError) as info:
        lay.get_with_ttl(key)
    assert info.value.layer == "L2"
    assert info.value.trips_breaker is False
    assert lay.get_many_with_ttl([key, "fine"]) == {"fine": ("ok", None)}
    assert lay.get_many([key]) == {}
    assert lay.stats().corrupt_values == before + 3


@pytest.mark.parametrize(
    "raw",
    [
        envelope(1, b"{not json"),
        envelope(1, b"\xff\xfe"),
        b"hello, I was written by another program",
        b"\x80\x04K\x01.",
        b"\xc1\x01",
        # b"" is not here: an empty value is a lease's stub, a miss (tests/test_lease.py)
        envelope(7, b"1"),
    ],
)
def test_corrupt_bytes_read_as_corrupt(memcached: MemcachedProcess, raw: bytes) -> None:
    lay = make_layer(memcached, default_ttl=None)
    lay.set("fine", "ok")
    raw_client(memcached).set(b"k", raw)
    assert_corrupt(lay, "k")


def test_json_layer_never_unpickles(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached, default_ttl=None)
    lay.set("fine", "ok")
    plain = raw_client(memcached)
    signed = SignedPickleCodec(SECRET).encode(Boom())
    plain.set(b"signed", envelope(2, signed))
    plain.set(b"pickle", pickle.dumps(Boom()))
    plain.set(b"in-json-slot", envelope(1, pickle.dumps(Boom())))
    for key in ("signed", "pickle", "in-json-slot"):
        assert_corrupt(lay, key)
    assert UNPICKLED == []


def test_pickle_layer_refuses_tampered_and_unsigned(memcached: MemcachedProcess) -> None:
    codec = SignedPickleCodec(SECRET)
    lay = make_layer(memcached, codec=codec, default_ttl=None)
    lay.set("fine", "ok")
    plain = raw_client(memcached)
    good = codec.encode(Boom())
    tampered = good[:32] + pickle.dumps(Boom(), protocol=2)
    other_secret = SignedPickleCodec(b"attacker guess").encode(Boom())
    plain.set(b"tampered", envelope(2, tampered))
    plain.set(b"other", envelope(2, other_secret))
    plain.set(b"unsigned", envelope(2, pickle.dumps(Boom())))
    plain.set(b"bare", pickle.dumps(Boom()))
    plain.set(b"json", envelope(1, b"[1]"))
    for key in ("tampered", "other", "unsigned", "bare", "json"):
        assert_corrupt(lay, key)
    assert UNPICKLED == []
    # Positive control: the same object, signed for this key and header, does unpickle.
    plain.set(b"good", pack(codec, Boom(), None, b"good"))
    lay.get("good")
    assert UNPICKLED == ["boom"]


def test_expired_envelope_is_a_miss(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached)
    raw_client(memcached).set(b"old", envelope(1, b"1", expires_at=time.time() - 1))
    assert lay.get_with_ttl("old") == (MISSING, None)
    assert lay.stats().corrupt_values == 0


# -- errors ------------------------------------------------------------------------------


def test_connection_refused_is_unavailable() -> None:
    lay = MemcachedLayer(servers=f"127.0.0.1:{free_port()}", timeout=0.2, connect_timeout=0.2)
    for call in (
        lambda: lay.get("k"),
        lambda: lay.set("k", 1),
        lambda: lay.delete("k"),
        lambda: lay.get_many(["k"]),
        lambda: lay.set_many({"k": 1}),
        lambda: lay.delete_many(["k"]),
    ):
        with pytest.raises(LayerUnavailableError) as info:
            call()
        err = info.value
        assert type(err) is LayerUnavailableError
        assert err.layer == "L2"
        assert isinstance(err.__cause__, ConnectionRefusedError)
        assert trips_breaker(err) is True
    assert lay.stats().connections_open == 0
    assert lay.stats().nodes_down == 0  # one node: no down-marking


def test_black_hole_times_out(fault_server: Any) -> None:
    lay = MemcachedLayer(servers=fault_server("blackhole").address, timeout=0.1)
    start = time.monotonic()
    with pytest.raises(LayerTimeoutError) as info:
        lay.get("k")
    assert time.monotonic() - start < 1.0
    assert info.value.layer == "L2"
    assert isinstance(info.value.__cause__, TimeoutError)
    assert isinstance(info.value, TimeoutError)
    assert lay.stats().connections_open == 0  # the client was discarded


def test_a_write_that_cannot_progress_times_out(fault_server: Any) -> None:
    # Nobody reads: 16 MB fill the socket buffers and sendall stalls.
    lay = MemcachedLayer(
        servers=fault_server("blackhole").address, timeout=0.1, max_value_size=32_000_000
    )
    start = time.monotonic()
    with pytest.raises(LayerTimeoutError):
        lay.set("k", "x" * 16_000_000)
    assert time.monotonic() - start < 2.0
    assert lay.stats().connections_open == 0


@pytest.mark.parametrize("timeout", [0.3, 2.5])
def test_pooled_connections_carry_the_read_write_timeout(
    memcached: MemcachedProcess, timeout: float
) -> None:
    lay = MemcachedLayer(servers=memcached.address, timeout=timeout)
    lay.set("k", 1)
    (client,) = lay._pool.nodes[0].idle
    # Armed with what the last call's deadline had left (exactly 0.3 only when the set
    # took under a millisecond: 0.2989 on CI's loaded matrix), never more.
    assert timeout - 0.25 < client.sock.gettimeout() <= timeout
    assert lay.get("k") == 1


def test_connect_timeout_bounds_connecting() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        lay = MemcachedLayer(servers=f"127.0.0.1:{port}", connect_timeout=0.1, timeout=5)
        start = time.monotonic()
        with pytest.raises(LayerTimeoutError):
            lay.get("k")
        assert time.monotonic() - start < 1.0
        assert lay.stats().connections_open == 0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_closed_connection_is_unavailable(fault_server: Any) -> None:
    # A 2 s timeout: the close, not the clock, ends the call (the default 0.25 s ran
    # out first on a loaded machine: LayerTimeoutError)
    lay = MemcachedLayer(servers=fault_server("close").address, timeout=2.0, connect_timeout=2.0)
    with pytest.raises(LayerUnavailableError) as info:
        lay.get("k")
    cause = info.value.__cause__
    assert isinstance(cause, (MemcacheUnexpectedCloseError, ConnectionResetError))


def test_unexpected_close_maps_to_unavailable() -> None:
    with HostileServer(lambda request: Close()) as server:
        lay = MemcachedLayer(servers=server.address, timeout=2.0)
        with pytest.raises(LayerUnavailableError, match="closed the connection") as info:
            lay.get("k")
        assert isinstance(info.value.__cause__, MemcacheUnexpectedCloseError)
        assert lay.stats().connections_open == 0
        lay.close()


@pytest.mark.parametrize(
    ("reply", "cause"),
    [
        (b"SERVER_ERROR out of memory\r\n", MemcacheServerError),
        (b"HELLO\r\n", MemcacheUnknownError),
        (b"VALUE k 0 notanumber\r\n", MemcacheUnknownError),
    ],
)
def test_server_and_protocol_errors_are_layer_errors(
    fault_server: Any, reply: bytes, cause: type[BaseException]
) -> None:
    lay = MemcachedLayer(servers=fault_server(reply).address, timeout=1)
    with pytest.raises(LayerError) as info:
        lay.get("k")
    err = info.value
    assert not isinstance(err, (LayerUnavailableError, LayerTimeoutError))
    assert err.error_type == "backend"
    assert err.layer == "L2"
    assert isinstance(err.__cause__, cause)
    assert lay.stats().connections_open == 0


def test_not_stored_is_a_layer_error() -> None:
    with HostileServer(lambda request: Send(b"NOT_STORED\r\n")) as server:
        lay = MemcachedLayer(servers=server.address, timeout=2.0)
        with pytest.raises(LayerError, match="did not store"):
            lay.set("k", 1)
        with pytest.raises(LayerError, match="did not store 2 keys"):
            lay.set_many({"a": 1, "b": 2})
        assert lay.stats().connections_open == 1  # a refusal is an answer: still in step
        lay.close()


def test_server_too_large_in_a_batch_falls_back_to_single_sets() -> None:
    answers = {
        b"big": b"SERVER_ERROR object too large for cache\r\n",
        b"refused": b"NOT_STORED\r\n",
    }

    def picky(request: Request) -> Reply:
        if request.command == b"set":
            return Send(answers.get(request.args[0], b"STORED\r\n"))
        return Send(b"DELETED\r\n")

    with HostileServer(picky) as server:
        lay = MemcachedLayer(servers=server.address, timeout=2.0)
        assert lay.set_many({"ok": 1, "big": 2}) == ["big"]
        sent = [(r.command, r.args[0]) for r in server.requests]
        # The batch, then each item alone, then the refused key's old value deleted.
        assert sent == [
            (b"set", b"ok"),
            (b"set", b"big"),
            (b"set", b"ok"),
            (b"set", b"big"),
            (b"delete", b"big"),
        ]
        with pytest.raises(LayerError, match="did not store 1 keys"):
            lay.set_many({"refused": 1, "ok2": 2})
        lay.close()


def test_an_all_invalid_batch_stores_nothing_and_deletes_old_values(
    layer: MemcachedLayer, monkeypatch: Any
) -> None:
    layer.set_many({"a": 1, "b": 2})
    spy = CallSpy(monkeypatch)
    assert layer.set_many({"a": object(), "b": {1, 2}}) == ["a", "b"]
    assert [name for name, _ in spy.calls] == ["delete_many"]  # one round trip; no store
    assert layer.get_many(["a", "b"]) == {}


def test_base_exception_discards_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(client: Connection, key: bytes, deadline: float) -> Any:
        client.sock = socket.socket()  # pretend a connection was open
        raise KeyboardInterrupt

    monkeypatch.setattr(_wire, "get", interrupted)
    lay = MemcachedLayer()
    with pytest.raises(KeyboardInterrupt):
        lay.get("k")
    assert lay.stats().connections_open == 0


def test_killed_server_discards_connections_and_recovers(
    own_memcached: MemcachedProcess,
) -> None:
    lay = make_layer(own_memcached, timeout=0.3, connect_timeout=0.3)
    lay.set("k", 1)
    assert lay.stats().connections_open == 1
    own_memcached.stop()
    for _ in range(3):  # one node: every call tries again, none is a NodeDownError
        with pytest.raises(LayerUnavailableError) as info:
            lay.get("k")
        assert type(info.value) is LayerUnavailableError
    assert lay.stats().connections_open == 0
    own_memcached.start()
    assert lay.get("k") is MISSING  # a fresh, empty server
    lay.set("k", 2)
    assert lay.get("k") == 2
    assert lay.stats().connections_open == 1


# -- pool --------------------------------------------------------------------------------


def test_pool_of_four_under_eight_threads(memcached: MemcachedProcess) -> None:
    # What is tested is the pool (no wrong value, no exhaustion, at most 4 connections),
    # not latency: on a loaded machine 8 threads can wait more than the default 0.5 s
    # for the GIL between a reply's arrival and its read (CI runs two suites on two
    # cores), so the call deadline is as loose as the pool's.
    lay = make_layer(memcached, pool_size=4, pool_timeout=10.0, timeout=10.0)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    mismatches: list[tuple[Any, Any]] = []

    def work(tid: int) -> None:
        try:
            barrier.wait()
            for i in range(150):
                key = f"t{tid}:{i % 10}"
                lay.set(key, [tid, i])
                got = lay.get(key)
                if got != [tid, i]:
                    mismatches.append((got, [tid, i]))
                many = lay.get_many([key, f"t{tid}:none"])
                if many != {key: [tid, i]}:
                    mismatches.append((many, key))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert mismatches == []
    stats = lay.stats()
    assert 1 <= stats.connections_open <= 4
    assert stats.pool_exhausted == 0


class SpyCondition(threading.Condition):
    """A Condition that says when a thread starts waiting on it."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def block_first_get(
    monkeypatch: pytest.MonkeyPatch, entered: threading.Event, release: threading.Event
) -> None:
    """Make the layer's next single-key read hold its pooled client until ``release``."""
    original = _wire.get
    block = [True]

    def get(client: Connection, key: bytes, deadline: float) -> bytes | None:
        if block[0]:
            block[0] = False
            entered.set()
            assert release.wait(10)
            deadline = time.monotonic() + client.timeout  # the hold is not the server's
        return original(client, key, deadline)

    monkeypatch.setattr(_wire, "get", get)


def test_pool_exhausted_error(memcached: MemcachedProcess, monkeypatch: Any) -> None:
    entered, release = threading.Event(), threading.Event()
    block_first_get(monkeypatch, entered, release)
    lay = make_layer(memcached, pool_size=1, pool_timeout=0.02)
    lay.set("k", "v")
    results: list[Any] = []
    holder = threading.Thread(target=lambda: results.append(lay.get("k")))
    holder.start()
    assert entered.wait(10)
    start = time.monotonic()
    with pytest.raises(PoolExhaustedError) as info:
        lay.get("k")
    assert time.monotonic() - start < 1.0
    assert isinstance(info.value, LayerUnavailableError)
    assert not isinstance(info.value, RuntimeError)
    assert info.value.trips_breaker is False
    assert info.value.layer == "L2"
    assert lay.stats().pool_exhausted == 1
    release.set()
    holder.join()
    assert results == ["v"]
    assert lay.get("k") == "v"
    assert lay.stats().connections_open == 1


def test_waiter_gets_the_released_client(memcached: MemcachedProcess, monkeypatch: Any) -> None:
    entered, release = threading.Event(), threading.Event()
    block_first_get(monkeypatch, entered, release)
    lay = make_layer(memcached, pool_size=1, pool_timeout=10)
    lay.set("k", "v")
    cond = SpyCondition()
    lay._pool.nodes[0].cond = cond
    results: list[Any] = []
    holder = threading.Thread(target=lambda: results.append(lay.get("k")))
    holder.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=lambda: results.append(lay.get("k")))
    waiter.start()
    assert cond.waiting.wait(10)
    release.set()
    holder.join()
    waiter.join()
    assert results == ["v", "v"]
    assert lay.stats().pool_exhausted == 0
    assert lay.stats().connections_open == 1


def test_get_many_is_one_round_trip(layer: MemcachedLayer, monkeypatch: Any) -> None:
    keys = [f"k{i}" for i in range(50)] + ["a b", "é"]
    assert layer.set_many({k: k for k in keys}) == []
    spy = CallSpy(monkeypatch)
    assert layer.get_many([*keys, "missing"]) == {k: k for k in keys}
    assert [c[0] for c in spy.calls] == ["get_many"]
    spy.calls.clear()
    assert len(layer.get_many_with_ttl(keys)) == len(keys)
    assert [c[0] for c in spy.calls] == ["get_many"]
    spy.calls.clear()
    assert layer.set_many({k: 1 for k in keys}) == []
    assert [c[0] for c in spy.calls] == ["set_many"]
    spy.calls.clear()
    layer.delete_many(keys)
    assert [c[0] for c in spy.calls] == ["delete_many"]


# -- cluster -----------------------------------------------------------------------------


@pytest.fixture()
def two_servers() -> Iterator[tuple[MemcachedProcess, MemcachedProcess]]:
    a = MemcachedProcess().start()
    b = MemcachedProcess().start()
    yield a, b
    a.stop()
    b.stop()


def split_keys(
    a: MemcachedProcess, b: MemcachedProcess, keys: list[str]
) -> tuple[list[str], list[str]]:
    """The keys stored on each server (read with plain clients)."""
    on_a = raw_client(a).get_many([memcached_key(k) for k in keys])
    on_b = raw_client(b).get_many([memcached_key(k) for k in keys])
    a_keys = [k for k in keys if memcached_key(k) in on_a]
    b_keys = [k for k in keys if memcached_key(k) in on_b]
    assert sorted(a_keys + b_keys) == sorted(keys)  # each key on exactly one server
    return a_keys, b_keys


def cluster_layer(servers: list[str], mono: FakeClock, **kwargs: Any) -> MemcachedLayer:
    return MemcachedLayer(
        "L2",
        servers,
        timeout=0.3,
        connect_timeout=0.3,
        dead_timeout=5.0,
        monotonic=mono,
        **kwargs,
    )


KEYS = [f"user:{i}" for i in range(200)]


def test_cluster_spreads_keys_stably(
    two_servers: tuple[MemcachedProcess, MemcachedProcess], monkeypatch: Any
) -> None:
    a, b = two_servers
    lay = cluster_layer([a.address, b.address], FakeClock(0.0))
    spy = CallSpy(monkeypatch)
    assert lay.set_many({k: k for k in KEYS}) == []
    assert sorted(c[1][1] for c in spy.calls) == sorted([a.port, b.port])  # one per node
    a_keys, _ = split_keys(a, b, KEYS)
    assert 60 <= len(a_keys) <= 140
    spy.calls.clear()
    assert lay.get_many(KEYS) == {k: k for k in KEYS}
    assert len(spy.calls) == 2
    # The order of the servers does not matter...
    reordered = cluster_layer([b.address, a.address], FakeClock(0.0))
    assert reordered.get_many(KEYS) == {k: k for k in KEYS}
    # ...and another process (another hash seed) finds every key where it was put.
    code = (
        "import json, sys\n"
        "from cachechain.layers._memcached import MemcachedLayer\n"
        "lay = MemcachedLayer('L2', sys.argv[1:])\n"
        f"print(json.dumps(lay.get_many({KEYS!r})))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, a.address, b.address],
        capture_output=True,
        check=True,
        timeout=60,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert json.loads(out.stdout) == {k: k for k in KEYS}


def test_dead_node_costs_only_its_keys(
    two_servers: tuple[MemcachedProcess, MemcachedProcess], monkeypatch: Any
) -> None:
    a, b = two_servers
    mono = FakeClock(1000.0)
    lay = cluster_layer([a.address, b.address], mono)
    lay.set_many({k: k for k in KEYS})
    a_keys, b_keys = split_keys(a, b, KEYS)
    b.stop()
    # First failure: the node is marked down, the call fails.
    with pytest.raises(LayerUnavailableError) as info:
        lay.get(b_keys[0])
    assert not isinstance(info.value, NodeDownError)
    assert lay.stats().nodes_down == 1
    # Now its keys fail fast, without any I/O; the other node's keys are served.
    spy = CallSpy(monkeypatch)
    created: list[Any] = []
    real_client = poolmod.Connection
    monkeypatch.setattr(
        poolmod, "Connection", lambda *a, **k: created.append(1) or real_client(*a, **k)
    )
    for call in (
        lambda: lay.get(b_keys[1]),
        lambda: lay.get_with_ttl(b_keys[1]),
        lambda: lay.set(b_keys[1], 1),
        lambda: lay.delete(b_keys[1]),
    ):
        with pytest.raises(NodeDownError) as down:
            call()
        assert down.value.trips_breaker is False
        assert down.value.layer == "L2"
        assert isinstance(down.value, LayerUnavailableError)
    assert spy.calls == []
    assert created == []
    assert lay.get_many(b_keys) == {}
    assert spy.calls == []
    assert lay.get(a_keys[0]) == a_keys[0]
    assert lay.get_many(KEYS) == {k: k for k in a_keys}
    # Writes still reach the live node, then report the dead one.
    with pytest.raises(NodeDownError):
        lay.set_many({k: "new" for k in KEYS})
    assert lay.get_many(a_keys) == {k: "new" for k in a_keys}
    with pytest.raises(NodeDownError):
        lay.delete_many(KEYS)
    assert lay.get_many(a_keys) == {}
    # After dead_timeout the node is tried again.
    b.start()
    mono.advance(5.0)
    assert lay.get(b_keys[0]) is MISSING  # restarted empty
    assert lay.stats().nodes_down == 0
    lay.set(b_keys[0], "back")
    assert lay.get(b_keys[0]) == "back"


def keys_on(lay: MemcachedLayer, server: MemcachedProcess) -> list[str]:
    """The keys among KEYS that ``lay`` places on ``server``."""
    return [k for k in KEYS if lay._pool.node_for(memcached_key(k)).port == server.port]


def test_failed_probe_marks_the_node_down_again(
    two_servers: tuple[MemcachedProcess, MemcachedProcess],
) -> None:
    a, b = two_servers
    mono = FakeClock(0.0)
    lay = cluster_layer([a.address, b.address], mono)
    a_keys, b_keys = keys_on(lay, a), keys_on(lay, b)
    lay.set(a_keys[0], 1)
    b.stop()
    # A fresh failure in a batch read where no node answered: it is raised.
    with pytest.raises(LayerUnavailableError) as info:
        lay.get_many(b_keys[:5])
    assert not isinstance(info.value, NodeDownError)
    assert lay.get_many(b_keys[:5]) == {}  # marked down: a plain miss
    mono.advance(4.9)
    with pytest.raises(NodeDownError):
        lay.get(b_keys[0])
    mono.advance(0.1)
    with pytest.raises(LayerUnavailableError) as probe:  # the probe fails...
        lay.get(b_keys[0])
    assert not isinstance(probe.value, NodeDownError)
    with pytest.raises(NodeDownError):  # ...and the node is down again
        lay.get(b_keys[0])
    mono.advance(5.0)
    # A batch in which one node answers: the failing node's keys just miss.
    assert lay.get_many([a_keys[0], *b_keys[:3]]) == {a_keys[0]: 1}
    assert lay.stats().nodes_down == 1


def drop_pooled_clients(lay: MemcachedLayer) -> None:
    for node in lay._pool.nodes:
        for client in node.clients:
            client.close()
        node.idle.clear()
        node.clients.clear()


def test_only_one_caller_probes_a_node(
    two_servers: tuple[MemcachedProcess, MemcachedProcess], monkeypatch: Any
) -> None:
    a, b = two_servers
    mono = FakeClock(0.0)
    lay = cluster_layer([a.address, b.address], mono)
    b_key = keys_on(lay, b)[0]
    lay.set(b_key, "v")
    b_node = next(n for n in lay._pool.nodes if n.port == b.port)
    lay._pool.mark(b_node, down=True)  # as after a failure
    mono.advance(5.0)
    entered, release = threading.Event(), threading.Event()
    block_first_get(monkeypatch, entered, release)
    drop_pooled_clients(lay)
    results: list[Any] = []
    prober = threading.Thread(target=lambda: results.append(lay.get(b_key)))
    prober.start()
    assert entered.wait(10)
    with pytest.raises(NodeDownError):  # the probe is in flight: others still skip
        lay.get(b_key)
    release.set()
    prober.join()
    assert results == ["v"]
    assert lay.stats().nodes_down == 0
    assert lay.get(b_key) == "v"


def test_timeout_marks_a_cluster_node_down(memcached: MemcachedProcess, fault_server: Any) -> None:
    hole = fault_server("blackhole")
    mono = FakeClock(0.0)
    lay = MemcachedLayer("L2", [memcached.address, hole.address], timeout=0.5, monotonic=mono)
    hole_key = next(k for k in KEYS if lay._pool.node_for(memcached_key(k)).port == hole.port)
    with pytest.raises(LayerTimeoutError):
        lay.get(hole_key)
    start = time.monotonic()
    with pytest.raises(NodeDownError):
        lay.get(hole_key)
    assert time.monotonic() - start < 0.25  # no wait for the node: under half a timeout
    assert lay.stats() == MemcachedLayerStats(
        corrupt_values=0, nodes=2, nodes_down=1, connections_open=0, pool_exhausted=0
    )


def test_server_error_does_not_mark_a_node_down(
    memcached: MemcachedProcess, fault_server: Any
) -> None:
    broken = fault_server(b"SERVER_ERROR busy\r\n")
    lay = MemcachedLayer("L2", [memcached.address, broken.address], timeout=1)
    key = next(k for k in KEYS if lay._pool.node_for(memcached_key(k)).port == broken.port)
    for _ in range(2):
        with pytest.raises(LayerError) as info:
            lay.get(key)
        assert not isinstance(info.value, LayerUnavailableError)
    with pytest.raises(LayerError):
        lay.get_many([key])
    assert lay.stats().nodes_down == 0


# -- close and fork ----------------------------------------------------------------------


def test_closed_layer_refuses_every_call(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached)
    lay.set("k", 1)
    assert lay.stats().connections_open == 1
    lay.close()
    lay.close()  # idempotent
    assert lay.closed
    assert lay.stats().connections_open == 0
    for call in (
        lambda: lay.get("k"),
        lambda: lay.get_with_ttl("k"),
        lambda: lay.get_many(["k"]),
        lambda: lay.get_many_with_ttl(["k"]),
        lambda: lay.set("k", 1),
        lambda: lay.set_many({"k": 1}),
        lambda: lay.delete("k"),
        lambda: lay.delete_many(["k"]),
    ):
        with pytest.raises(ChainClosedError):
            call()


def test_close_during_calls(memcached: MemcachedProcess, monkeypatch: Any) -> None:
    entered, release = threading.Event(), threading.Event()
    block_first_get(monkeypatch, entered, release)
    lay = make_layer(memcached, pool_size=1, pool_timeout=10)
    lay.set("k", "v")
    cond = SpyCondition()
    lay._pool.nodes[0].cond = cond
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(lay.get("k"))
        except ChainClosedError as exc:
            results.append(exc)

    holder = threading.Thread(target=call)
    holder.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=call)
    waiter.start()
    assert cond.waiting.wait(10)
    lay.close()  # wakes the waiter; the busy client closes when its call ends
    waiter.join()
    assert isinstance(results[0], ChainClosedError)
    release.set()
    holder.join()
    assert results[1] == "v"
    assert lay.stats().connections_open == 0


def test_a_client_released_while_the_layer_closes_is_not_left_open(
    memcached: MemcachedProcess,
) -> None:
    """close() runs between a release's check of ``closed`` and its return of the
    client to the idle list: the client must still be closed, not left idle."""
    lay = make_layer(memcached)
    lay.set("k", "v")
    node = lay._pool.nodes[0]

    class CloseOnAppend(list[Any]):
        def append(self, client: Any) -> None:
            lay.close()
            super().append(client)

    node.idle = CloseOnAppend(node.take_idle())
    assert lay.get("k") == "v"
    assert lay.stats().connections_open == 0
    assert list(node.idle) == []


def test_forked_child_gets_fresh_connections_and_locks(memcached: MemcachedProcess) -> None:
    lay = make_layer(memcached)
    lay.set("k", "parent")
    node = lay._pool.nodes[0]
    parent_client = next(iter(node.clients))
    parent_port = parent_client.sock.getsockname()[1]
    # Another thread holds the pool lock while we fork, as may happen in a real app.
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with node.cond:
            holding.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(read_fd)
            got = lay.get("k")
            lay.set("k", "child")
            client = next(iter(lay._pool.nodes[0].clients))
            report = {
                "got": got,
                "port": client.sock.getsockname()[1],
                "inherited": client is parent_client,
                "open": lay.stats().connections_open,
            }
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        data = os.read(read_fd, 65536) if ready else b""
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
        done.set()
        holder.join()
    assert data, "the forked child hung (an inherited lock?)"
    report = json.loads(data)
    assert report == {"got": "parent", "port": report["port"], "inherited": False, "open": 1}
    assert report["port"] != parent_port
    # The parent's connection was not disturbed by the child closing its copy.
    assert lay.get("k") == "child"
    assert next(iter(node.clients)) is parent_client


def test_reset_after_fork_drops_inherited_state(
    memcached: MemcachedProcess, monkeypatch: Any
) -> None:
    """What the at-fork hook does in a child, run here where coverage can see it."""
    lay = make_layer(memcached)
    lay.set("k", 1)
    node = lay._pool.nodes[0]
    old_client = next(iter(node.clients))
    old_cond = node.cond
    monkeypatch.setattr(_fork, "_TRACKED", weakref.WeakSet([lay]))
    _fork.after_fork_in_child()
    assert node.cond is not old_cond
    assert node.clients == set()
    assert old_client.sock is None  # this process's copy of the socket is closed
    assert lay.get("k") == 1
    assert next(iter(node.clients)) is not old_client


@pytest.mark.memcached
def test_clear_flushes_every_node_of_a_cluster() -> None:
    servers = [MemcachedProcess().start(), MemcachedProcess().start()]
    try:
        lay = MemcachedLayer("L2", [s.address for s in servers])
        keys = [f"k{i}" for i in range(40)]
        lay.set_many({k: k for k in keys}, 60)
        held = [Client(("127.0.0.1", s.port)).stats()[b"curr_items"] for s in servers]
        assert all(n > 0 for n in held), held  # both nodes hold keys
        lay.clear()
        assert lay.get_many(keys) == {}
        lay.close()
        with pytest.raises(ChainClosedError):
            lay.clear()
    finally:
        for s in servers:
            s.stop()
