"""Tests of cachechain.codecs: JSON and signed-pickle codecs, and the envelope."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import hmac
import math
import pickle
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

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
from tests.support.fakes import UNPICKLED, Boom

SECRET = b"test-secret"


@dataclass
class Point:
    x: int
    y: int


def sign(secret: bytes, body: bytes) -> bytes:
    """Sign ``body`` the documented way (independent of the codec's code)."""
    key = hmac.new(secret, b"cachechain.SignedPickleCodec.v1", hashlib.sha256).digest()
    return hmac.new(key, body, hashlib.sha256).digest()


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
    assert JsonCodec.codec_id == 1
    assert SignedPickleCodec.codec_id == 2
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
