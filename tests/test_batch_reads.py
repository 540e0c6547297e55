"""Issue 14, item 2: a batch read costs less per key. Each fast path reads exactly what
the one-by-one path reads, and hands everything else to it: the envelopes of a batch
(``Envelope.read_plain_many``), the keys of a batch (``map_many``), and the items of
a ``get`` reply (one regex match per plain item in ``Connection.get_many``)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachechain._codecs import (
    _HEADER,
    EXPIRED,
    CorruptValueError,
    Envelope,
    JsonCodec,
    SignedPickleCodec,
    pack,
)
from cachechain._errors import InvalidKeyError
from cachechain.layers._base import MISSING
from cachechain.layers._counters import COUNTER_FLAG, RawCounter
from cachechain.layers._memcached_keys import map_key, map_many
from tests.support.hostile import Drip, HostileServer, Send, value_reply
from tests.test_hardening_wire import layer_on

JSON = Envelope(JsonCodec())


def envelope(payload: bytes, stamp: float = 0.0, magic: int = 0xC1, codec: int = 1) -> bytes:
    return _HEADER.pack(magic, codec, stamp) + payload


def one_by_one(data: bytes) -> Any:
    try:
        return JSON.unpack(data)
    except CorruptValueError:
        return "corrupt"


#: Payloads each read alone; in a batch, neighbours must not change what one reads.
PAYLOADS = [
    b'{"id":1,"name":"a"}',
    b"1,2",
    b"[1",
    b"2]",
    b'"a',
    b'b"',
    b"1e",
    b"5",
    b"1e400",
    b"NaN",
    b"-Infinity",
    b" 1",
    b"1 ",
    b"1\n",
    b"",
    b"[]",
    b'"caf\xc3\xa9"',
    b"\xff",
    b"null",
    b"true",
    b'{"a":[1,2,{"b":null}]}',
    b"12345678901234567890",
    b"0.5",
    b'"\\n"',
]


@pytest.mark.parametrize("seed", range(30))
def test_a_batch_of_envelopes_reads_as_each_one_alone(seed: int) -> None:
    rng = random.Random(seed)
    datas = [
        envelope(rng.choice(PAYLOADS), stamp=rng.choice([0.0, 1.5e9, -1.0, float("inf")]))
        for _ in range(rng.randint(1, 12))
    ]
    datas += [pack(JsonCodec(), "stamped", None)]
    now = rng.choice([1.0e9, 1.5e9, 2.0e9])
    for got, data in zip(JSON.read_plain_many(datas, now), datas, strict=True):
        if got is not None:  # read in the batch: exactly what unpack reads
            value, expires_at = JSON.unpack(data)
            if expires_at is not None and expires_at <= now:
                assert got is EXPIRED
                continue
            assert got == (value, None if expires_at is None else expires_at - now)
            assert type(got[0]) is type(value)  # type: ignore[index]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("stamp", [0.0, 1.5e9, -1.0, float("nan")])
def test_one_envelope_read_in_one_step_reads_as_unpack_does(payload: bytes, stamp: float) -> None:
    data = envelope(payload, stamp)
    got = JSON.read_plain(data)
    if got is not None:
        assert got == JSON.unpack(data)
    else:  # a plain JSON envelope is left to unpack only when unpack refuses it
        assert one_by_one(data) == "corrupt"


def test_what_one_step_reads_and_what_it_leaves() -> None:
    assert JSON.read_plain(envelope(b'"caf\xc3\xa9"', 2e9)) == ("café", 2e9)
    assert JSON.read_plain(envelope(b"[1,2]")) == ([1, 2], None)
    for data in (
        envelope(b"1,2"),
        envelope(b"1e400"),
        envelope(b"1", magic=0xC2),
        envelope(b"1", codec=2),
        b"",
        RawCounter(b"7"),
    ):
        assert JSON.read_plain(data) is None
    assert Envelope(Sub()).read_plain(envelope(b"1")) is None


def test_only_well_formed_ascii_json_envelopes_are_read_in_a_batch() -> None:
    good = [envelope(b'{"id":1}'), envelope(b"[1,2]", 1.7e9), envelope(b"3", 1.2e9)]
    assert JSON.read_plain_many(good, 1.5e9) == [({"id": 1}, None), ([1, 2], 2e8), EXPIRED]
    others = [
        envelope(b"1,2"),  # two values
        envelope(b'"caf\xc3\xa9"'),  # not ASCII: read alone
        envelope(b"1", magic=0xC2),  # stamped
        envelope(b"1", codec=2),  # another codec
        envelope(b"1", stamp=float("nan")),
        envelope(b"1e400"),
        b"",  # a lease's stub
        RawCounter(b"12"),
    ]
    assert JSON.read_plain_many(others, 1.5e9) == [None] * len(others)
    # a batch with one non-ASCII payload is read one by one, none of it in the batch
    assert JSON.read_plain_many([good[0], others[1]], 1.5e9) == [None, None]


def test_another_codec_is_never_read_in_a_batch() -> None:
    env = Envelope(SignedPickleCodec(b"k" * 32))
    data = env.pack(1, None, b"k")
    assert env.read_plain_many([data], 1.5e9) == [None]


class Sub(JsonCodec):
    def decode(self, data: bytes) -> Any:
        return ("mine", super().decode(data))


def test_a_subclass_of_the_json_codec_decodes_its_own_way() -> None:
    env = Envelope(Sub())
    assert env.read_plain_many([envelope(b"1")], 1.5e9) == [None]


@pytest.mark.parametrize(
    "key",
    ["plain", "with space", "", "~tilde", "é", "x" * 300, "a\r\nb", "ok:1", "x" * 236, "x" * 237],
)
def test_map_many_maps_each_key_as_map_key_does(key: str) -> None:
    prefix = "app:" + "p" * 10
    assert map_many([key, "other", key], prefix) == {
        map_key(key, prefix): key,
        map_key("other", prefix): "other",
    }


def test_map_many_refuses_a_key_that_is_not_a_str() -> None:
    with pytest.raises(InvalidKeyError):
        map_many(["a", b"b"], "")  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError):
        map_many(iter(["a", None]), "p:", "g:")  # type: ignore[list-item]


# Keys near every edge of the raw test: printable ASCII, space, "~", controls, non-ASCII.
_KEY_TEXT = st.text(st.sampled_from(["a", "Z", "~", " ", "}", "!", "\x7f", "\n", "é", ":"]))
_KEYS = st.lists(st.one_of(_KEY_TEXT, st.text(max_size=3), st.integers(230, 260).map("k".__mul__)))


@given(
    keys=_KEYS,
    prefix=st.sampled_from(["", "app:", "p" * 64]),
    inner=st.sampled_from(["", "g7:", "~g:", "g 1:", "é:", "x" * 40]),
)
def test_map_many_maps_any_batch_as_map_key_maps_each_key(
    keys: list[str], prefix: str, inner: str
) -> None:
    """The one-pass batch and the key-by-key loop both map as map_key does."""
    expected = {map_key(inner + key, prefix): key for key in keys}
    assert map_many(keys, prefix, inner) == expected
    assert map_many(iter(keys), prefix, inner) == expected  # not a list: copied first


class ShortLen(str):
    """A key whose ``len`` lies."""

    def __len__(self) -> int:
        return 1


def test_a_key_whose_len_lies_is_measured_as_a_str() -> None:
    key = ShortLen("x" * 249)  # 251 bytes after "p:": must be hashed
    expected = {map_key("x" * 249, "p:"): key}
    assert map_many([key], "p:") == expected
    assert map_many([key, "a"], "p:") == expected | {b"p:a": "a"}
    assert map_key(key, "p:") == map_key("x" * 249, "p:")
    assert len(map_key(key, "p:")) <= 250


def test_a_batch_of_raw_keys_is_mapped_in_one_pass() -> None:
    from cachechain.layers._memcached_keys import _map_raw

    assert _map_raw(["a", "b~", "a"], "p:", "g1:") == {b"p:g1:a": "a", b"p:g1:b~": "b~"}
    assert _map_raw(["x" * 248], "p:", "") == {b"p:" + b"x" * 248: "x" * 248}
    assert _map_raw(["~x"], "", "g:") == {b"g:~x": "~x"}  # raw after a raw prefix
    # Every other batch goes key by key: one key to hash, a space in a key, too long.
    for keys, inner in ((["a", "~x"], ""), (["a b"], ""), (["x" * 249], ""), (["a"], "~g:")):
        assert _map_raw(keys, "p:", inner) is None


# -- the wire: a get reply read item by item or in one pass gives the same result -------


def items(count: int, flags: int = 0) -> tuple[list[str], bytes]:
    keys = [f"k{i}" for i in range(count)]
    body = b"".join(
        value_reply(map_key(k, ""), pack(JsonCodec(), {"n": i}, None), flags)[: -len(b"END\r\n")]
        for i, k in enumerate(keys)
    )
    return keys, body + b"END\r\n"


@pytest.mark.parametrize("drip", [False, True])
def test_a_get_many_reply_in_one_read_or_in_pieces_reads_the_same(drip: bool) -> None:
    keys, reply = items(30)
    with HostileServer() as server:
        server.answer(
            lambda request: Drip(reply, interval=0.0005, chunk=7) if drip else Send(reply)
        )
        lay = layer_on(server, timeout=5.0)
        got = lay.get_many([*keys, "absent"])
        lay.close()
    assert got == {k: {"n": i} for i, k in enumerate(keys)}


def test_a_counter_in_a_batch_is_read_as_a_counter() -> None:
    keys, plain = items(3)
    counter = value_reply(b"c", b"41", COUNTER_FLAG)[: -len(b"END\r\n")]
    reply = plain[: -len(b"END\r\n")] + counter + b"END\r\n"
    with HostileServer() as server:
        server.answer(lambda request: Send(reply))
        lay = layer_on(server)
        got = lay.get_many([*keys, "c"])
        lay.close()
    assert got["c"] == 41
    assert [got[k] for k in keys] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_corrupt_value_in_a_batch_is_left_out_and_counted() -> None:
    keys, plain = items(2)
    bad = value_reply(b"bad", envelope(b"1,2"), 0)[: -len(b"END\r\n")]
    reply = bad + plain
    with HostileServer() as server:
        server.answer(lambda request: Send(reply))
        lay = layer_on(server)
        got = lay.get_many_with_ttl([*keys, "bad"])
        corrupt = lay.stats().corrupt_values
        lay.close()
    assert set(got) == set(keys)
    assert MISSING not in [v for v, _ in got.values()]
    assert corrupt == 1
    assert json.dumps(got["k0"][0]) == '{"n": 0}'
