"""Tests of cachechain.codecs: JSON and signed-pickle codecs, and the envelope."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import hashlib
import hmac
import json
import math
import pickle
import struct
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachechain._codecs import (
    ENVELOPE_HEADER_SIZE,
    ENVELOPE_MAGIC,
    Codec,
    CorruptValueError,
    JsonCodec,
    SignedPickleCodec,
    TaggedJsonCodec,
    pack,
    unpack,
)
from cachechain._errors import (
    ConfigError,
    InvalidValueError,
    LayerError,
    classify_error,
    trips_breaker,
)
from cachechain._tagged import MAX_DEPTH, TAGS
from tests.support.fakes import UNPICKLED, Boom

SECRET = b"test-secret"


@dataclass
class Point:
    x: int
    y: int


def sign(secret: bytes, body: bytes, context: bytes = b"") -> bytes:
    """Sign ``context`` and ``body`` the documented way (independent of the codec's
    code): HMAC-SHA256, under a key derived for the format, of the context's length
    (4 bytes, big-endian), the context and the pickle."""
    key = hmac.new(secret, b"cachechain.SignedPickleCodec.v2", hashlib.sha256).digest()
    message = struct.pack(">I", len(context)) + context + body
    return hmac.new(key, message, hashlib.sha256).digest()


# -- CorruptValueError -------------------------------------------------------------------


def test_corrupt_value_error_classification() -> None:
    err = CorruptValueError("bad", layer="L2")
    assert isinstance(err, LayerError)
    assert err.layer == "L2"
    assert err.error_type == "serialization"
    assert classify_error(err) == "serialization"
    assert err.trips_breaker is False
    assert trips_breaker(err) is False


def test_codecs_satisfy_the_protocol() -> None:
    assert isinstance(JsonCodec(), Codec)
    assert isinstance(SignedPickleCodec(SECRET), Codec)
    assert isinstance(TaggedJsonCodec(), Codec)
    assert JsonCodec.codec_id == 1
    assert SignedPickleCodec.codec_id == 2
    assert TaggedJsonCodec.codec_id == 3
    assert not isinstance(object(), Codec)


# -- JsonCodec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -17,
        2**70,
        1.5,
        -0.0,
        "",
        "text",
        "héllo wörld ✓ 😀",
        [],
        {},
        [1, "a", None, [2, [3]]],
        {"a": {"b": [1, 2, {"c": None}]}, "é": 1.25},
    ],
)
def test_json_round_trip(value: Any) -> None:
    codec = JsonCodec()
    assert codec.decode(codec.encode(value)) == value


def test_json_is_compact_utf8() -> None:
    assert JsonCodec().encode({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'.encode()


def test_json_tuples_read_back_as_lists() -> None:
    codec = JsonCodec()
    assert codec.decode(codec.encode((1, (2, 3), {"t": (4,)}))) == [1, [2, 3], {"t": [4]}]


def test_json_lone_surrogate_round_trips() -> None:
    codec = JsonCodec()
    data = codec.encode({"s": "a\ud800b"})
    assert data.isascii()
    assert codec.decode(data) == {"s": "a\ud800b"}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({1, 2}, "set"),
        (b"bytes", "bytes"),
        (object(), "object"),
        (datetime.date(2024, 1, 1), "date"),
        (decimal.Decimal("1.5"), "Decimal"),
        (float("nan"), "Out of range float"),
        (float("inf"), "Out of range float"),
        ({"x": [float("-inf")]}, "Out of range float"),
        ({1: "a"}, "int key"),
        ({"a": [{"b": {None: 1}}]}, "NoneType key"),
        ([({2.5: 1},)], "float key"),
    ],
)
def test_json_rejects_non_json_values(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidValueError) as info:
        JsonCodec().encode(value)
    assert fragment in str(info.value)
    assert info.value.trips_breaker is False


def nested(depth: int, *, as_dict: bool = False) -> Any:
    """A value with arrays (or objects) nested ``depth`` deep: ``nested(2) == [[0]]``."""
    value: Any = 0
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


def test_json_rejects_circular_values() -> None:
    loop: list[Any] = []
    loop.append(loop)
    inner: dict[str, Any] = {}
    deeper = {"a": [1, {"b": inner}]}
    inner["back"] = (deeper,)
    for value in (loop, deeper):
        with pytest.raises(InvalidValueError, match="Circular") as info:
            JsonCodec().encode(value)
        assert info.value.trips_breaker is False
    shared = [1, {"x": 2}]  # the same object twice, but no cycle
    codec = JsonCodec()
    assert codec.decode(codec.encode({"a": shared, "b": [shared, shared]})) == {
        "a": shared,
        "b": [shared, shared],
    }


def _long(tail: Any, n: int = 40) -> list[Any]:
    """``n`` scalars of every JSON type, then ``tail``: a container long enough for
    the structure check's C-speed pass."""
    return [*(x for i in range(n // 4) for x in (f"s{i}", i, i + 0.5, None)), True, tail]


def test_json_long_containers_are_checked_as_short_ones() -> None:
    """The structure check passes over a long container of scalars at C speed; what
    it must refuse it still refuses in one, however late it comes."""
    codec = JsonCodec()
    scalars = _long("end")
    assert codec.decode(codec.encode(scalars)) == scalars
    as_dict = {f"k{i}": v for i, v in enumerate(scalars)}
    assert codec.decode(codec.encode(as_dict)) == as_dict
    loop = _long(None)
    loop[-1] = loop
    keyed: dict[Any, Any] = dict(as_dict)
    keyed[7] = "int key"
    with pytest.raises(InvalidValueError, match="Circular"):
        codec.encode(loop)
    with pytest.raises(InvalidValueError, match="keys must be str"):
        codec.encode(keyed)
    deep = _long(nested(JsonCodec.MAX_DEPTH))  # one level more than the limit
    with pytest.raises(InvalidValueError, match="nested more than"):
        codec.encode(deep)
    with pytest.raises(InvalidValueError, match="nested more than"):
        codec.encode({f"k{i}": i for i in range(40)} | {"last": nested(JsonCodec.MAX_DEPTH)})
    subclass = type("Text", (str,), {})
    assert codec.decode(codec.encode(_long(subclass("x")))) == _long("x")


@pytest.mark.parametrize("as_dict", [False, True])
def test_json_nesting_limit_is_the_codecs_own_on_every_python(as_dict: bool) -> None:
    # The same values are refused on every Python: the interpreters' own limits differ
    # (3.10/3.11 near sys.getrecursionlimit(), 3.12/3.13 thousands deep, or none).
    codec = JsonCodec()
    limit = JsonCodec.MAX_DEPTH
    assert codec.decode(codec.encode(nested(limit, as_dict=as_dict))) == nested(
        limit, as_dict=as_dict
    )
    for depth in (limit + 1, sys.getrecursionlimit() + 100, 200_000):
        with pytest.raises(InvalidValueError, match=f"nested more than {limit} deep") as info:
            codec.encode(nested(depth, as_dict=as_dict))
        assert info.value.trips_breaker is False
    # Tuples count as arrays.
    with pytest.raises(InvalidValueError, match="nested more than"):
        codec.encode((nested(limit),))


def test_json_a_value_at_the_limit_reads_back_from_a_deep_call_stack() -> None:
    # A reader may be a few hundred frames deep (a web framework, middleware, a
    # template) when it decodes: a value the codec accepts still reads back there.
    codec = JsonCodec()
    data = codec.encode(nested(JsonCodec.MAX_DEPTH))

    def decode_at(depth: int) -> Any:
        return codec.decode(data) if depth == 0 else decode_at(depth - 1)

    assert decode_at(250) == nested(JsonCodec.MAX_DEPTH)


def test_json_rejects_int_too_large_for_str() -> None:
    with pytest.raises(InvalidValueError):
        JsonCodec().encode(10**5000)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"{'a': 1}", b"\xff\xfe", b"NaN", b"[Infinity]", b"[1]x", b"[" * 100_000],
)
def test_json_decode_rejects_bad_bytes(data: bytes) -> None:
    with pytest.raises(CorruptValueError, match="not valid JSON"):
        JsonCodec().decode(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_json_round_trip_property(value: Any) -> None:
    codec = JsonCodec()
    assert codec.decode(codec.encode(value)) == value


# -- SignedPickleCodec -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, {1, 2}, b"\x00bytes", (1, (2,)), Point(1, 2), {1: "int key"}, float("inf")],
)
def test_pickle_round_trip_keeps_python_types(value: Any) -> None:
    codec = SignedPickleCodec(SECRET)
    assert codec.decode(codec.encode(value)) == value
    assert type(codec.decode(codec.encode(value))) is type(value)


def test_pickle_payload_is_signature_then_highest_protocol_pickle() -> None:
    data = SignedPickleCodec(SECRET).encode({"a": 1})
    body = data[32:]
    assert data[:32] == sign(SECRET, body)
    assert body == pickle.dumps({"a": 1}, protocol=pickle.HIGHEST_PROTOCOL)


def test_str_secret_is_its_utf8_bytes() -> None:
    data = SignedPickleCodec("sécret").encode([1])
    assert SignedPickleCodec("sécret".encode()).decode(data) == [1]


@pytest.mark.parametrize("secret", [b"", ""])
def test_empty_secret_is_a_config_error(secret: bytes | str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        SignedPickleCodec(secret)


def test_secret_of_wrong_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret"):
        SignedPickleCodec(1234)  # type: ignore[arg-type]


def test_repr_hides_the_secret() -> None:
    assert "test-secret" not in repr(SignedPickleCodec(SECRET))
    assert repr(JsonCodec()) == "JsonCodec()"


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock()])
def test_unpicklable_value_is_invalid(value: Any) -> None:
    with pytest.raises(InvalidValueError, match="cannot be pickled"):
        SignedPickleCodec(SECRET).encode(value)


def test_valid_signature_does_unpickle_positive_control() -> None:
    codec = SignedPickleCodec(SECRET)
    codec.decode(codec.encode(Boom()))
    assert UNPICKLED == ["boom"]


def test_tampered_body_is_refused_before_unpickling() -> None:
    codec = SignedPickleCodec(SECRET)
    good = codec.encode(Boom())
    evil = pickle.dumps(Boom(), protocol=2)
    tampered = good[:32] + evil  # old signature, new body
    with pytest.raises(CorruptValueError, match="bad signature"):
        codec.decode(tampered)
    flipped = bytearray(good)
    flipped[-2] ^= 0x01
    with pytest.raises(CorruptValueError, match="bad signature"):
        codec.decode(bytes(flipped))
    assert UNPICKLED == []


def test_tampered_signature_and_other_secret_are_refused() -> None:
    data = SignedPickleCodec(b"other secret").encode(Boom())
    with pytest.raises(CorruptValueError, match="bad signature"):
        SignedPickleCodec(SECRET).decode(data)
    bad_sig = bytes([data[0] ^ 0xFF]) + data[1:]
    with pytest.raises(CorruptValueError):
        SignedPickleCodec(b"other secret").decode(bad_sig)
    assert UNPICKLED == []


def test_unsigned_and_plainly_signed_pickles_are_refused() -> None:
    codec = SignedPickleCodec(SECRET)
    body = pickle.dumps(Boom())
    for data in (
        body,  # no signature at all
        b"\x00" * 32 + body,  # a zero signature
        hmac.new(SECRET, body, hashlib.sha256).digest() + body,  # HMAC without domain key
    ):
        with pytest.raises(CorruptValueError):
            codec.decode(data)
    assert UNPICKLED == []


@pytest.mark.parametrize("size", [0, 1, 31, 32])
def test_truncated_signed_pickle_is_corrupt(size: int) -> None:
    with pytest.raises(CorruptValueError, match="truncated"):
        SignedPickleCodec(SECRET).decode(b"\x01" * size)


def test_signed_pickle_that_no_longer_loads_is_corrupt() -> None:
    body = b"cno_such_module_for_cachechain_tests\nThing\n."
    with pytest.raises(CorruptValueError, match="does not load") as info:
        SignedPickleCodec(SECRET).decode(sign(SECRET, body) + body)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# -- TaggedJsonCodec ---------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1 == 1.0 == True`` is not
    enough: a codec that turned a tuple into a list or an int key into a str fails)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):  # the codec keeps the order of the items
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (datetime.datetime, datetime.time)):
        return a == b and a.utcoffset() == b.utcoffset()
    return bool(a == b)


UTC_PLUS_2 = datetime.timezone(datetime.timedelta(hours=2))

TAGGED_VALUES = [
    None,
    True,
    0,
    -(2**70),
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    "héllo ✓ 😀",
    "a\ud800b",
    b"",
    b"\x00\xffraw",
    bytearray(b"ba"),
    (),
    (1, (2, "3")),
    {1, 2.5, "x"},
    frozenset({(1, 2)}),
    [b"in a list", (None,)],
    {},
    {"sauce": [], 256: "truffle"},  # cachelib's sample data: a non-str key
    {(1, 2): {b"k": frozenset()}, None: True, 1.5: 0},
    {" t": [1, 2]},  # a dict that looks like a tag
    {" d": 1, "x": 2},
    {"nested": {" b": "not base64!"}},
    datetime.datetime(2024, 1, 2, 3, 4, 5, 6),
    datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc),
    datetime.datetime(2024, 1, 2, 3, tzinfo=UTC_PLUS_2),
    datetime.date(2024, 2, 29),
    datetime.time(23, 59, 59, 999999),
    datetime.time(1, tzinfo=UTC_PLUS_2),
    datetime.timedelta(days=-3, seconds=5, microseconds=7),
    decimal.Decimal("1.10"),
    decimal.Decimal("-Infinity"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
]


@pytest.mark.parametrize("value", TAGGED_VALUES, ids=repr)
def test_tagged_round_trip_keeps_the_types(value: Any) -> None:
    codec = TaggedJsonCodec()
    decoded = codec.decode(codec.encode(value))
    assert same(decoded, value)
    if isinstance(value, (list, dict, set, bytearray)):
        assert decoded is not value  # a fresh object


def test_tagged_format() -> None:
    codec = TaggedJsonCodec()
    assert codec.encode(b"raw") == b"\x00raw"  # top-level bytes: no base64
    assert codec.encode([b"raw"]) == b'[{" b":"cmF3"}]'
    assert codec.encode({"a": (1,)}) == b'{"a":{" t":[1]}}'
    assert codec.encode({1: "x"}) == b'{" d":[[1,"x"]]}'
    assert codec.encode({" t": 1}) == b'{" d":[[" t",1]]}'  # escaped: not read as a tag
    assert codec.encode({"a": 1, "é": [None]}) == '{"a":1,"é":[null]}'.encode()  # plain JSON
    assert JsonCodec().decode(codec.encode({"a": [1]})) == {"a": [1]}
    assert {" b", " ba", " f", " t", " s", " fs", " d", " dt", " da", " tm"} | {
        " td",
        " dec",
        " u",
    } == TAGS


class Colour(enum.IntEnum):
    RED = 1


class Pair(NamedTuple):
    a: int
    b: int


class Text(str):
    pass


class Zone(datetime.tzinfo):
    """A time zone that is not a fixed offset (as a zoneinfo zone is not)."""

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (object(), "builtins.object is not a supported type"),
        (Point(1, 2), "Point is not a supported type"),
        (collections.OrderedDict(a=1), "OrderedDict"),  # subclasses are not their base
        (Pair(1, 2), "Pair"),
        (Colour.RED, "Colour"),
        (Text("x"), "Text"),
        ([1, {"a": threading.Lock()}], "lock"),
        ({Pair(1, 2): 1}, "Pair"),
        (datetime.datetime(2024, 1, 1, tzinfo=Zone()), "tzinfo"),
        (datetime.time(1, tzinfo=Zone()), "tzinfo"),
    ],
)
def test_tagged_refuses_other_types(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidValueError, match="tagged JSON") as info:
        TaggedJsonCodec().encode(value)
    assert fragment in str(info.value)
    assert info.value.trips_breaker is False


def test_tagged_refuses_an_int_too_large_for_str() -> None:
    with pytest.raises(InvalidValueError, match="tagged JSON"):
        TaggedJsonCodec().encode([10**5000])


def test_tagged_refuses_circular_values() -> None:
    loop: list[Any] = []
    loop.append((loop,))
    with pytest.raises(InvalidValueError, match="circular reference"):
        TaggedJsonCodec().encode(loop)
    shared = (1, [2])
    codec = TaggedJsonCodec()
    assert same(codec.decode(codec.encode([shared, shared])), [shared, shared])


def tagged_nested(depth: int) -> Any:
    """Containers ``depth`` deep, of every kind that takes two JSON levels."""
    value: Any = 0
    for level in range(depth):
        value = [(value,), {level: value}, {"k": value}][level % 3]
    return value


def test_tagged_nesting_limit_and_a_deep_call_stack() -> None:
    codec = TaggedJsonCodec()
    deepest = tagged_nested(MAX_DEPTH)
    data = codec.encode(deepest)

    def at_depth(depth: int, call: Any) -> Any:
        return call() if depth == 0 else at_depth(depth - 1, call)

    # A reader or writer a few hundred frames deep (a framework, middleware) still works.
    assert same(at_depth(250, lambda: codec.decode(at_depth(0, lambda: data))), deepest)
    assert at_depth(250, lambda: codec.encode(deepest)) == data
    for depth in (MAX_DEPTH + 1, sys.getrecursionlimit() + 100):
        with pytest.raises(InvalidValueError, match=f"nested more than {MAX_DEPTH} deep"):
            codec.encode(tagged_nested(depth))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"[1]x", "extra data"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nested more than {MAX_DEPTH}"),
        (b'{" t":1}', "holds int, not a list"),
        (b'{" b":"!!"}', "tagged JSON"),
        (b'{" b":1}', "base64 text expected"),
        (b'{" d":[[1]]}', "pair expected"),
        (b'{" d":[[[1],2]]}', "unhashable"),
        (b'{" s":[[1]]}', "unhashable"),
        (b'{" td":[1,2]}', "[days, seconds, microseconds]"),
        (b'{" td":[1e999999,0,0]}', "out of the range of a float"),
        (b'{" f":"1.5"}', "'nan', 'inf' or '-inf'"),
        (b'{" dt":5}', "isoformat text"),
        (b'{" dt":"yesterday"}', "Invalid isoformat"),
        (b'{" u":"zz"}', "tagged JSON"),
        (b'{" dec":"abc"}', "tagged JSON"),
        (b'{" dec":1}', "decimal text"),
    ],
)
def test_tagged_decode_rejects_what_no_value_encodes_to(data: bytes, fragment: str) -> None:
    with pytest.raises(CorruptValueError) as info:
        TaggedJsonCodec().decode(data)
    assert fragment in str(info.value)


def test_tagged_reader_never_unpickles() -> None:
    codec = TaggedJsonCodec()
    with pytest.raises(CorruptValueError):
        codec.decode(pickle.dumps(Boom()))
    payload = pickle.dumps(Boom())
    assert codec.decode(b"\x00" + payload) == payload  # raw bytes are data, never loaded
    with pytest.raises(CorruptValueError, match="codec 2"):
        unpack(codec, pack(SignedPickleCodec(SECRET), Boom(), None))
    assert UNPICKLED == []
    assert repr(codec) == "TaggedJsonCodec()"


TAGGED_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc))
    | st.dates()
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.uuids()
)
# Set members and keys: no NaN (a NaN is not equal to itself, so no set finds it).
HASHABLE = st.recursive(
    TAGGED_LEAVES.filter(lambda v: not (isinstance(v, float) and math.isnan(v))),
    lambda children: st.tuples(children) | st.frozensets(children),
    max_leaves=6,
)
TAGGED = st.recursive(
    TAGGED_LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.sets(HASHABLE, max_size=3)
        | st.dictionaries(st.text(max_size=3) | HASHABLE, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(TAGGED)
def test_tagged_round_trip_property(value: Any) -> None:
    codec = TaggedJsonCodec()
    assert same(codec.decode(codec.encode(value)), value)


# -- envelope ----------------------------------------------------------------------------


def test_envelope_layout() -> None:
    data = pack(JsonCodec(), [1], 1_700_000_000.25)
    assert len(data) == ENVELOPE_HEADER_SIZE + 3 == 13
    assert data[0] == ENVELOPE_MAGIC == 0xC1
    assert data[1] == 1
    assert struct.unpack(">d", data[2:10]) == (1_700_000_000.25,)
    assert data[10:] == b"[1]"


def test_envelope_round_trip() -> None:
    json_codec, pickle_codec = JsonCodec(), SignedPickleCodec(SECRET)
    assert unpack(json_codec, pack(json_codec, {"a": 1}, None)) == ({"a": 1}, None)
    assert unpack(json_codec, pack(json_codec, "x", 12.5)) == ("x", 12.5)
    assert unpack(json_codec, pack(json_codec, "x", 7)) == ("x", 7.0)
    assert pack(json_codec, "x", None)[2:10] == struct.pack(">d", 0.0)
    assert unpack(pickle_codec, pack(pickle_codec, {1, 2}, 99.0)) == ({1, 2}, 99.0)


@pytest.mark.parametrize("expires_at", [0, 0.0, -1.0, math.nan, math.inf, "soon"])
def test_pack_rejects_invalid_expiry(expires_at: Any) -> None:
    with pytest.raises(InvalidValueError, match="expires_at"):
        pack(JsonCodec(), 1, expires_at)


def test_pack_propagates_codec_refusal() -> None:
    with pytest.raises(InvalidValueError):
        pack(JsonCodec(), {1, 2}, None)


@pytest.mark.parametrize("size", [0, 1, 9])
def test_unpack_truncated(size: int) -> None:
    data = pack(JsonCodec(), 1, None)[:size]
    with pytest.raises(CorruptValueError, match="truncated"):
        unpack(JsonCodec(), data)


def test_unpack_wrong_magic() -> None:
    data = b"\x80" + pack(JsonCodec(), 1, None)[1:]
    with pytest.raises(CorruptValueError, match="unknown envelope"):
        unpack(JsonCodec(), data)
    with pytest.raises(CorruptValueError, match="unknown envelope"):
        unpack(JsonCodec(), b"plain old value written by someone else")


def test_json_reader_never_unpickles_a_signed_pickle() -> None:
    data = pack(SignedPickleCodec(SECRET), Boom(), None)
    with pytest.raises(CorruptValueError, match="codec 2"):
        unpack(JsonCodec(), data)
    assert UNPICKLED == []


def test_pickle_reader_refuses_json_envelope() -> None:
    with pytest.raises(CorruptValueError, match="codec 1"):
        unpack(SignedPickleCodec(SECRET), pack(JsonCodec(), [1], None))


@pytest.mark.parametrize("stamp", [-1.0, math.nan, math.inf])
def test_unpack_invalid_expiry(stamp: float) -> None:
    data = struct.pack(">BBd", ENVELOPE_MAGIC, 1, stamp) + b"1"
    with pytest.raises(CorruptValueError, match="expiry"):
        unpack(JsonCodec(), data)


def test_unpack_payload_rejected_by_codec() -> None:
    data = pack(JsonCodec(), 1, None)[:ENVELOPE_HEADER_SIZE] + b"{oops"
    with pytest.raises(CorruptValueError, match="JSON"):
        unpack(JsonCodec(), data)
    unsigned = struct.pack(">BBd", ENVELOPE_MAGIC, 2, 0.0) + b"\x00" * 32 + pickle.dumps(Boom())
    with pytest.raises(CorruptValueError, match="signature"):
        unpack(SignedPickleCodec(SECRET), unsigned)
    assert UNPICKLED == []


# -- the encoder made once (issue 10: the cost of an add) -------------------------------

_SAME_AS_JSON_DUMPS = [
    0,
    1,
    -17,
    10**200,
    True,
    False,
    None,
    1.5,
    -0.0,
    1e300,
    "",
    "plain",
    'quote " and \\ and \n',
    "café ☕",
    "\ud800 lone surrogate",
    [1, "a", [None, {"k": 2.5}]],
    {"a": {"b": [True, False]}, "é": "x"},
    (1, 2),
]


@pytest.mark.parametrize("value", _SAME_AS_JSON_DUMPS, ids=repr)
def test_the_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        expected = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: written escaped
        expected = json.dumps(value, separators=(",", ":")).encode("ascii")
    assert JsonCodec().encode(value) == expected
    assert JsonCodec().decode(JsonCodec().encode(value)) == json.loads(expected)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), [float("-inf")], b"bytes", {1: "int key"}, {1.5}]
)
def test_the_encoder_still_refuses_what_json_cannot_hold(value: Any) -> None:
    with pytest.raises(InvalidValueError):
        JsonCodec().encode(value)
