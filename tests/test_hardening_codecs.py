"""Issue 11, the codecs' items: a signature covers the envelope's header, the memcached
key and the payload (3); a value a layer refuses gives the same answer whatever its
writer holds, and the JSON decoders refuse what the encoders refuse (10)."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client

from cachechain import (
    MISSING,
    Chain,
    CoherenceConfig,
    ConfigError,
    CorruptValueError,
    JsonCodec,
    LayerConfig,
    MemcachedLayer,
    MemoryLayer,
    SignedPickleCodec,
    TaggedJsonCodec,
)
from cachechain._codecs import ENVELOPE_HEADER_SIZE, ENVELOPE_MAGIC, binds_context
from cachechain._namespace import codec_tag
from cachechain.metrics._memory import MemoryCollector
from tests.support.fakes import UNPICKLED, Boom, FakeClock
from tests.support.servers import MemcachedProcess

pytestmark = pytest.mark.memcached

SECRET = b"hardening-secret"
START = 1_700_000_000.0


def raw_client(server: MemcachedProcess) -> Client:
    """A plain pymemcache client: raw bytes, waits for replies."""
    return Client(("127.0.0.1", server.port), default_noreply=False, timeout=2, connect_timeout=2)


@pytest.fixture()
def raw(memcached: MemcachedProcess) -> Iterator[Client]:
    client = raw_client(memcached)
    yield client
    client.close()


def signed_layer(server: MemcachedProcess, name: str = "L2", **kwargs: Any) -> MemcachedLayer:
    kwargs.setdefault("codec", SignedPickleCodec(SECRET))
    return MemcachedLayer(name, server.address, timeout=2, connect_timeout=2, **kwargs)


def assert_counted_miss(layer: MemcachedLayer, key: str) -> None:
    """``key`` reads as corrupt (a miss for a chain), counted, never unpickled."""
    before = layer.stats().corrupt_values
    with pytest.raises(CorruptValueError, match="signature"):
        layer.get_with_ttl(key)
    assert layer.get_many([key]) == {}
    assert layer.stats().corrupt_values == before + 2


# -- 3. the signature covers the header, the key and the payload ----------------------


def test_a_signed_entry_whose_expiry_was_zeroed_reads_as_a_miss(
    memcached: MemcachedProcess, raw: Client
) -> None:
    wall = FakeClock(start=START)
    layer = signed_layer(memcached, clock=wall)
    layer.set("k", {"secret": "v1"}, ttl=60)
    wall.advance(120)
    assert layer.get("k") is MISSING  # expired by its envelope, still in memcached
    stored = raw.get(b"k")
    assert struct.unpack(">d", stored[2:10]) == (START + 60,)
    raw.set(b"k", stored[:2] + struct.pack(">d", 0.0) + stored[10:])  # "never expires"
    assert_counted_miss(layer, "k")
    with Chain([MemoryLayer("L1"), layer], coherence=False) as chain:
        assert chain.get("k", "default") == "default"


def test_a_signed_entry_whose_expiry_was_moved_later_reads_as_a_miss(
    memcached: MemcachedProcess, raw: Client
) -> None:
    wall = FakeClock(start=START)
    layer = signed_layer(memcached, clock=wall)
    layer.set("k", "v1", ttl=60)
    stored = raw.get(b"k")
    raw.set(b"k", stored[:2] + struct.pack(">d", START + 10**6) + stored[10:])
    assert_counted_miss(layer, "k")


def test_a_signed_entry_copied_under_another_key_reads_as_a_miss_there(
    memcached: MemcachedProcess, raw: Client
) -> None:
    layer = signed_layer(memcached, default_ttl=None)
    layer.set("price:A-1", 10)
    raw.set(b"price:B-2", raw.get(b"price:A-1"))
    assert_counted_miss(layer, "price:B-2")
    assert layer.get("price:A-1") == 10  # the original still reads
    assert layer.get_many(["price:A-1", "price:B-2"]) == {"price:A-1": 10}
    with Chain([MemoryLayer("L1"), layer], coherence=False) as chain:
        assert chain.get("price:B-2", "default") == "default"
        assert chain.get("price:A-1") == 10


def test_a_signed_entry_copied_to_a_layer_with_another_prefix_reads_as_a_miss(
    memcached: MemcachedProcess, raw: Client
) -> None:
    site_a = signed_layer(memcached, key_prefix="a:", default_ttl=None)
    site_b = signed_layer(memcached, key_prefix="b:", default_ttl=None)
    site_a.set("k", Boom())
    raw.set(b"b:k", raw.get(b"a:k"))
    assert_counted_miss(site_b, "k")
    assert UNPICKLED == []


def old_format_entry(secret: bytes, value: Any, expires_at: float = 0.0) -> bytes:
    """An entry as 0.1 and earlier 0.2 builds wrote it: the signature covers the pickle
    alone, under the key derived with the v1 label."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    key = hmac.new(secret, b"cachechain.SignedPickleCodec.v1", hashlib.sha256).digest()
    signature = hmac.new(key, body, hashlib.sha256).digest()
    return struct.pack(">BBd", ENVELOPE_MAGIC, 2, expires_at) + signature + body


def test_an_entry_of_the_old_signed_format_reads_as_a_counted_miss(
    memcached: MemcachedProcess, raw: Client
) -> None:
    layer = signed_layer(memcached, default_ttl=None)
    raw.set(b"old", old_format_entry(SECRET, Boom()))
    raw.set(b"older", old_format_entry(SECRET, "v0"))
    assert_counted_miss(layer, "old")
    assert_counted_miss(layer, "older")
    assert UNPICKLED == []
    collector = MemoryCollector()
    with Chain([MemoryLayer("L1"), layer], metrics=collector, coherence=False) as chain:
        assert chain.get("older", "default") == "default"  # no exception reaches the caller
        assert chain.get_many(["old", "older"]) == {}
        assert chain.get_or_load("older", lambda: "reloaded") == "reloaded"
        errors = collector.snapshot().layer_metrics["L2"].errors_by_type
        assert errors["serialization"] >= 2  # get, get_or_load (get_many drops them)
        assert chain.breakers["L2"].state.name == "CLOSED"
        assert chain.flush(10)
        assert layer.get("older") == "reloaded"  # written again in the new format


def test_the_signature_is_of_the_header_the_memcached_key_and_the_pickle(
    memcached: MemcachedProcess, raw: Client
) -> None:
    """The documented format, rebuilt independently of the codec's code."""
    layer = signed_layer(memcached, key_prefix="p:", clock=FakeClock(start=START))
    layer.set("k", [1, 2], ttl=30)
    stored = raw.get(b"p:k")
    header, signature, body = stored[:10], stored[10:42], stored[42:]
    assert header == struct.pack(">BBd", ENVELOPE_MAGIC, 2, START + 30)
    context = header + b"p:k"
    key = hmac.new(SECRET, b"cachechain.SignedPickleCodec.v2", hashlib.sha256).digest()
    message = struct.pack(">I", len(context)) + context + body
    assert signature == hmac.new(key, message, hashlib.sha256).digest()
    assert pickle.loads(body) == [1, 2]


@pytest.mark.parametrize("index", range(ENVELOPE_HEADER_SIZE))
def test_every_byte_of_the_header_is_checked(
    memcached: MemcachedProcess, raw: Client, index: int
) -> None:
    layer = signed_layer(memcached, clock=FakeClock(start=START))
    layer.set("k", "v", ttl=30)
    stored = bytearray(raw.get(b"k"))
    stored[index] ^= 0x01
    raw.set(b"k", bytes(stored))
    with pytest.raises(CorruptValueError):
        layer.get_with_ttl("k")


def test_touch_incr_and_add_keep_working_on_signed_entries(
    memcached: MemcachedProcess, raw: Client
) -> None:
    wall = FakeClock(start=START)
    layer = signed_layer(memcached, clock=wall)
    layer.set("t", {"a": 1}, ttl=10)
    assert layer.touch("t", 100)
    assert layer.get_with_ttl("t") == ({"a": 1}, pytest.approx(100))
    assert struct.unpack(">d", raw.get(b"t")[2:10]) == (START + 100,)
    layer.set("n", 41, ttl=60)
    assert layer.incr("n") == 42
    layer.set("lock", "held", ttl=30)  # not 1 s: memcached may end that at once
    assert layer.add("lock", "mine", ttl=60) is False
    wall.advance(31)
    assert layer.add("lock", "mine", ttl=60) is True
    assert layer.get("lock") == "mine"


def test_touch_refuses_a_forged_signed_entry(memcached: MemcachedProcess, raw: Client) -> None:
    layer = signed_layer(memcached, default_ttl=None)
    layer.set("a", "v")
    raw.set(b"b", raw.get(b"a"))
    with pytest.raises(CorruptValueError):
        layer.touch("b", 100)  # never signed again for the new expiry
    assert_counted_miss(layer, "b")


# -- codecs without a context still work; codecs with one get header and key ----------


class PlainCodec:
    """A user codec as written for 0.1: no context."""

    codec_id = 7

    def encode(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


class RecordingCodec(PlainCodec):
    """A user codec that binds its payloads: it records the contexts it is given."""

    def __init__(self) -> None:
        self.contexts: list[bytes] = []
        self.lock = threading.Lock()

    def encode(self, value: Any, *, context: bytes = b"") -> bytes:  # type: ignore[override]
        with self.lock:
            self.contexts.append(context)
        return super().encode(value)

    def decode(self, data: bytes, *, context: bytes = b"") -> Any:  # type: ignore[override]
        with self.lock:
            self.contexts.append(context)
        return super().decode(data)


def test_a_codec_without_a_context_keeps_working(memcached: MemcachedProcess) -> None:
    assert binds_context(PlainCodec()) is False
    assert binds_context(JsonCodec()) is False
    assert binds_context(TaggedJsonCodec()) is False
    layer = MemcachedLayer("L2", memcached.address, codec=PlainCodec())
    layer.set("k", {"a": [1]})
    assert layer.get("k") == {"a": [1]}
    assert layer.get_many(["k"]) == {"k": {"a": [1]}}


def test_a_codec_with_a_context_gets_the_header_and_the_memcached_key(
    memcached: MemcachedProcess, raw: Client
) -> None:
    codec = RecordingCodec()
    assert binds_context(codec) is True
    assert binds_context(SignedPickleCodec(SECRET)) is True
    layer = MemcachedLayer("L2", memcached.address, codec=codec, key_prefix="x:")
    layer.set("k", 5)
    assert layer.get("k") == 5
    header = raw.get(b"x:k")[:ENVELOPE_HEADER_SIZE]
    assert codec.contexts == [header + b"x:k", header + b"x:k"]


class HalfBound(PlainCodec):
    def encode(self, value: Any, *, context: bytes = b"") -> bytes:  # type: ignore[override]
        return super().encode(value)


class NoDefault(PlainCodec):
    def encode(self, value: Any, *, context: bytes) -> bytes:  # type: ignore[override]
        return super().encode(value)

    def decode(self, data: bytes, *, context: bytes) -> Any:  # type: ignore[override]
        return super().decode(data)


@pytest.mark.parametrize(
    ("codec", "fragment"),
    [(HalfBound(), "codec.encode takes a context but codec.decode"), (NoDefault(), "default")],
)
def test_a_codec_with_a_context_on_one_side_or_without_default_is_a_config_error(
    codec: Any, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        MemcachedLayer("L2", "127.0.0.1:1", codec=codec)


def test_the_namespace_tag_still_tells_secrets_apart() -> None:
    def tag(codec: Any) -> str:
        return codec_tag(MemcachedLayer("L2", "127.0.0.1:1", codec=codec))

    assert tag(SignedPickleCodec(b"a")) == tag(SignedPickleCodec(b"a"))
    assert tag(SignedPickleCodec(b"a")) != tag(SignedPickleCodec(b"b"))
    assert tag(SignedPickleCodec(b"a")) not in (tag(JsonCodec()), tag(TaggedJsonCodec()))
    # Found in session 12: JSON and tagged JSON encode the probe alike, so they shared
    # one generation and journal, each unable to read what the other stored there.
    assert tag(JsonCodec()) != tag(TaggedJsonCodec())
    assert tag(JsonCodec()) == tag(JsonCodec())


def test_chains_of_json_and_tagged_json_share_a_memcached_without_clearing_each_other(
    memcached: MemcachedProcess,
) -> None:
    """Each reads its own generation. They shared one (JSON and tagged JSON encode the
    namespace probe alike): the chain of the second codec could not read it, and every
    call of its shared layer failed."""
    prefix = f"{uuid.uuid4().hex[:8]}:"

    def chain(codec: Any) -> Chain:
        layer = MemcachedLayer("L2", memcached.address, key_prefix=prefix, codec=codec)
        return Chain([MemoryLayer("L1"), layer], coherence=CoherenceConfig(bound=30.0))

    plain, tagged = chain(JsonCodec()), chain(TaggedJsonCodec())
    try:
        assert plain.set("k", "plain's") and tagged.set("k", "tagged's")
        for c in (plain, tagged):
            c.layers[0].clear()  # type: ignore[attr-defined]
        assert plain.get("k") == "plain's" and tagged.get("k") == "tagged's"
        later = chain(JsonCodec())  # another process of the first codec, later
        assert later.get("k") == "plain's"  # in the same namespace: nothing was cleared
        later.close()
        assert plain.coherence is not None and tagged.coherence is not None
        assert plain.coherence.namespace.generation_key != tagged.coherence.namespace.generation_key
    finally:
        plain.close()
        tagged.close()


# -- 10(b). the JSON decoders refuse what the encoders refuse -------------------------

NOT_FINITE = [b"1e400", b"-1e400", b"[1,1e999]", b'{"a":-1E400}', b"NaN", b"Infinity", b"-Infinity"]


@pytest.mark.parametrize("data", NOT_FINITE)
@pytest.mark.parametrize("codec", [JsonCodec(), TaggedJsonCodec()], ids=["json", "tagged"])
def test_the_json_decoders_refuse_non_finite_numbers(data: bytes, codec: Any) -> None:
    with pytest.raises(CorruptValueError, match="JSON"):
        codec.decode(data)


@pytest.mark.parametrize("codec", [JsonCodec(), TaggedJsonCodec()], ids=["json", "tagged"])
def test_the_largest_finite_floats_still_read_back(codec: Any) -> None:
    for value in (1.7976931348623157e308, -1.7976931348623157e308, 5e-324, 1e-400):
        assert codec.decode(codec.encode(value)) == float(value)
    assert TaggedJsonCodec().decode(TaggedJsonCodec().encode(float("inf"))) == float("inf")


def test_a_stored_1e400_is_a_counted_miss(memcached: MemcachedProcess, raw: Client) -> None:
    layer = MemcachedLayer("L2", memcached.address)
    raw.set(b"k", struct.pack(">BBd", ENVELOPE_MAGIC, 1, 0.0) + b"1e400")
    with pytest.raises(CorruptValueError, match="range of a float"):
        layer.get_with_ttl("k")
    assert layer.stats().corrupt_values == 1


# -- 10(a). a refused value: the same answer whatever the writer holds ---------------


def unpicklable() -> Any:
    return threading.Lock()


@pytest.mark.parametrize("write_behind", [False, True], ids=["settling", "write-behind"])
@pytest.mark.parametrize(
    ("codec", "make_bad"),
    [
        (None, lambda: {1, 2}),  # JSON cannot encode a set
        (None, lambda: "x" * (2 * 1024 * 1024)),  # over max_value_size
        (SignedPickleCodec(SECRET), unpicklable),
    ],
    ids=["not-json", "too-large", "unpicklable"],
)
def test_set_of_a_refused_value_is_false_whatever_the_repair_state(
    memcached: MemcachedProcess, codec: Any, make_bad: Any, write_behind: bool
) -> None:
    collector = MemoryCollector()
    l2 = MemcachedLayer("L2", memcached.address, codec=codec, timeout=2)
    other_process = MemcachedLayer("elsewhere", memcached.address, codec=codec, timeout=2)
    config = LayerConfig(layer=l2, write_behind=write_behind)
    with Chain([MemoryLayer("L1"), config], metrics=collector, coherence=False) as chain:
        writer = chain.writers["L2"]
        assert chain.set("k", "v1") is True
        assert chain.flush(10)
        assert other_process.get("k") == "v1"
        bad = make_bad()
        assert chain.set("k", bad) is False  # nothing pending for k
        assert writer.holds("k")  # a repair (or the queued delete) is pending now
        assert chain.set("k", bad) is False  # the same answer with it pending
        assert chain.set_many({"k": bad, "fine": 1}) is False
        assert chain.flush(10)
        assert not writer.holds("k")
        assert chain.set("k", bad) is False  # and once it is done
        assert chain.flush(10)
        assert chain.get("k") is bad  # the in-process layer took it and serves it
        assert other_process.get_many(["k", "fine"]) == {"fine": 1}  # no old value left
        errors = collector.snapshot().layer_metrics["L2"].errors_by_type
        # Settling: a set that must wait behind the repair becomes a delete, its value
        # never encoded; write-behind checks every value it queues.
        assert errors == {"serialization": 4 if write_behind else 2}
    other_process.close()


def test_a_refused_value_does_not_wait_in_the_queue(memcached: MemcachedProcess) -> None:
    """Checked before it is queued: the writer gets a delete, not the refused set."""
    l2 = MemcachedLayer("L2", memcached.address, timeout=2)
    config = LayerConfig(layer=l2, write_behind=True)
    with Chain([MemoryLayer("L1"), config], coherence=False) as chain:
        assert chain.set("k", {1, 2}) is False
        assert chain.flush(10)
        stats = chain.writers["L2"].stats()
        assert stats.failed == 0  # the writer never tried to encode it
        assert stats.written == 1  # the delete
