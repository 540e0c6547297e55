"""Value codecs: how a remote layer turns values into bytes and back, and the envelope.

A codec encodes one value into bytes and decodes them back. Three are provided:

- :class:`JsonCodec` (the default, ``codec_id`` 1): compact JSON. Only JSON types are
  accepted: ``dict`` with ``str`` keys, ``list``, ``tuple`` (read back as a ``list``),
  ``str``, ``int``, ``float`` (finite), ``bool`` and ``None``. Reading it back never runs
  code.
- :class:`SignedPickleCodec` (``codec_id`` 2): any picklable value, signed with
  HMAC-SHA256 under a secret. The signature is checked before anything is unpickled,
  so whoever can write to the cache but does not know the secret cannot make a reader
  run code (the Flask-Caching and Django pickle problem). In a layer the signature
  covers the envelope's header (its expiry included) and the memcached key too, so
  such a writer cannot make an entry live longer nor copy it under another key.
- :class:`TaggedJsonCodec` (``codec_id`` 3): JSON plus tagged ``bytes``, ``tuple``,
  ``set``, dates and times, ``Decimal``, ``UUID`` and dicts with keys of those types
  (:mod:`cachechain._tagged`); reading it back never runs code either. The Django and
  Flask backends give it to memcached when the application has no secret to sign
  pickles with.

:func:`pack` and :func:`unpack` wrap a codec's payload in a 10-byte envelope::

    byte 0      magic/version (0xC1, never the first byte of UTF-8 text, JSON or pickle)
    byte 1      codec id
    bytes 2-9   expires_at: big-endian IEEE double, unix wall-clock seconds, 0.0 = never
    bytes 10-   the codec's payload

so a reader can tell an expired entry (sub-second TTLs that memcached cannot express),
and refuses bytes written by anything else, or by a layer with another codec.

A *stamped* entry (a value ``get_or_load`` keeps past its logical expiry as a fail-safe
copy, see :mod:`cachechain.layers._stamps`) has a 26-byte header::

    byte 0      0xC2
    byte 1      codec id
    bytes 2-9   expires_at: when the entry is gone (its physical expiry), 0.0 = never
    bytes 10-17 fresh_until: its logical expiry (unix seconds, > 0)
    bytes 18-25 ttl: the TTL it was stored with (seconds, > 0)
    bytes 26-   the codec's payload

Readers that are not asked for stamps (:meth:`Envelope.unpack`, :func:`expiry_of`)
see ``fresh_until`` as the entry's expiry, so a stamped entry past it is expired for
them; :meth:`Envelope.read` gives all three. A signing codec binds the whole header,
``fresh_until`` included: nobody without the secret can make a copy fresh again.

A codec that signs its payloads binds them to a *context* (:func:`binds_context`): its
``encode`` and ``decode`` take a keyword argument ``context``, and :class:`Envelope`
(what a layer uses) passes the envelope's header followed by the memcached key, which
the codec authenticates together with the payload. Zeroing the expiry of a signed entry
or copying it under another key then breaks its signature: it reads as a corrupt value
(a miss), never as a live one.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import json.scanner
import math
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Protocol, cast, runtime_checkable

from . import _tagged
from ._errors import ConfigError, CorruptValueError, InvalidValueError
from ._validate import check_optional_seconds, check_seconds

__all__ = [
    "ENVELOPE_HEADER_SIZE",
    "ENVELOPE_MAGIC",
    "EXPIRED",
    "STAMPED_HEADER_SIZE",
    "STAMPED_MAGIC",
    "Codec",
    "CorruptValueError",
    "Envelope",
    "Expired",
    "JsonCodec",
    "SignedPickleCodec",
    "TaggedJsonCodec",
    "binds_context",
    "check_codec",
    "expiry_of",
    "pack",
    "restamp",
    "unpack",
]

#: The first byte of every envelope: format version 1 of cachechain's envelope.
ENVELOPE_MAGIC = 0xC1
#: The first byte of a stamped envelope (logical expiry and TTL in the header).
STAMPED_MAGIC = 0xC2

_HEADER = struct.Struct(">BBd")
_STAMPED_HEADER = struct.Struct(">BBddd")

#: Bytes of envelope before the codec payload (magic, codec id, ``expires_at``).
ENVELOPE_HEADER_SIZE = _HEADER.size
#: A plain envelope's expiry alone (``_HEADER``'s last field, at offset 2).
_STAMP = struct.Struct(">d")
#: Bytes of a stamped envelope before the payload (plus ``fresh_until`` and ``ttl``).
STAMPED_HEADER_SIZE = _STAMPED_HEADER.size


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back, for the layers that store bytes.

    A codec that signs its payloads (anything that trusts what it reads because of a
    MAC, as :class:`SignedPickleCodec` does) must bind them to their place: its
    ``encode`` and ``decode`` then also take a keyword argument ``context``
    (``bytes``, with a default, ``b""``, so that the codec is still a ``Codec``), and
    ``decode`` refuses a payload unless ``context`` is the one it was encoded with.
    A layer detects this once, when it is made (:func:`binds_context`), and passes
    the envelope's header (its expiry included) followed by the memcached key, so an
    entry whose expiry was edited, or that was copied under another key, reads as a
    corrupt value. A codec that reads untrusted bytes safely (JSON) needs no context.

    Processes whose codecs cannot read each other's values keep apart in a shared
    memcached (each its own namespace generation and coherence journal), told apart by
    a digest of ``codec_id`` and the codec's encoding of a fixed probe. A codec may name
    its group itself with a ``namespace_tag`` attribute (a non-empty ``str``); it must
    then differ between any two codecs, or secrets, that cannot read each other's
    values.
    """

    @property
    def codec_id(self) -> int:
        """This codec's id, 0-255, stored in the envelope so that a reader configured
        with another codec refuses the data instead of misreading it."""

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as bytes.

        Raises :class:`~cachechain.InvalidValueError`, naming the problem, when
        the value cannot be encoded.
        """

    def decode(self, data: bytes) -> Any:
        """Return the value that ``data`` encodes.

        Raises :class:`CorruptValueError` when ``data`` is not a valid encoding.
        """


class _BoundCodec(Protocol):
    """A codec that binds its payloads to a context (see :class:`Codec`)."""

    codec_id: int

    def encode(self, value: Any, *, context: bytes = b"") -> bytes: ...

    def decode(self, data: bytes, *, context: bytes = b"") -> Any: ...


def check_codec(codec: object) -> Codec:
    """Return ``codec`` if it provides ``codec_id`` (an ``int`` in 0-255), ``encode``
    and ``decode``. Raises :class:`~cachechain.ConfigError` naming the field
    otherwise."""
    if not isinstance(codec, Codec):
        raise ConfigError(f"codec must provide codec_id, encode and decode, got {codec!r}")
    codec_id = codec.codec_id
    if isinstance(codec_id, bool) or not isinstance(codec_id, int) or not 0 <= codec_id < 256:
        raise ConfigError(f"codec.codec_id must be an int in 0-255, got {codec_id!r}")
    return codec


def binds_context(codec: Codec) -> bool:
    """Whether ``codec`` binds its payloads to a context (see :class:`Codec`): both its
    ``encode`` and its ``decode`` take a keyword argument ``context``.

    Raises :class:`~cachechain.ConfigError` when only one of them does, or when
    ``context`` cannot be passed by keyword or has no default.
    """
    encode = _takes_context(codec.encode, "encode")
    decode = _takes_context(codec.decode, "decode")
    if encode != decode:
        has, lacks = ("encode", "decode") if encode else ("decode", "encode")
        raise ConfigError(
            f"codec.{has} takes a context but codec.{lacks} does not: a codec binds its "
            f"payloads to a context in both or in neither"
        )
    return encode


def _takes_context(method: Any, name: str) -> bool:
    """Whether ``method`` has a parameter ``context``; ConfigError if it has one that
    cannot be passed by keyword or has no default."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # no signature to read (a builtin): no context
        return False
    param = signature.parameters.get("context")
    if param is None:
        return False
    keyword = param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    if not keyword or param.default is param.empty:
        raise ConfigError(
            f"codec.{name} must take context as a keyword argument with a default "
            f"(b''), got {name}{signature}"
        )
    return True


def _reject_constant(name: str) -> Any:
    """``parse_constant`` hook for :func:`json.loads`: NaN and infinities are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """``parse_float`` hook for :func:`json.loads`: a number too large for a float
    (``1e400``) would read as an infinity, which the encoders refuse to write."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the range of a float")
    return value


#: One decoder for every call (``json.loads`` with a hook builds a new one each time),
#: used through its scanner: our encoder writes no surrounding whitespace. It reads
#: what the encoders write: no NaN, no infinity, whether spelt out or out of range.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_SCAN = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]  # the stub names the wrong type


class Expired:
    """The type of :data:`EXPIRED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EXPIRED"


#: What :meth:`Envelope.read_plain_many` gives, with ``now``, for an entry whose expiry
#: has passed (a miss, not a corrupt value).
EXPIRED: Final = Expired()


#: The encoders, built once (``json.dumps`` with options builds one per call: about
#: half the cost of encoding a small value).
_TO_TEXT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_TO_ASCII = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _refuse(value: Any) -> Any:
    """The ``default`` of :data:`_ENCODE`: a value of no JSON type is refused."""
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: The C encoder behind ``_TO_TEXT``, made once (``JSONEncoder.encode`` makes one per
#: call: most of the cost of encoding a small value). Without circular checks: the
#: codecs check containers themselves (``_check_structure``), and a cycle would end in
#: a RecursionError anyway. ``None`` where the C accelerator is missing.
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_ENCODE: Callable[[Any, int], Sequence[str]] | None = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
)


def _json_text(value: Any, what: str) -> bytes:
    """Compact UTF-8 JSON of ``value`` (a lone surrogate in a ``str`` is kept, escaped
    as ``\\udXXX``, which JSON allows). Raises InvalidValueError, naming ``what`` the
    encoding is, for a value JSON cannot hold."""
    try:
        if value.__class__ is int:  # a counter or a flag: no encoder at all
            text = int.__repr__(value)
        elif _ENCODE is not None:
            text = "".join(_ENCODE(value, 0))
        else:
            text = _TO_TEXT(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidValueError(f"value cannot be encoded as {what}: {exc}") from exc
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _TO_ASCII(value).encode("ascii")


def _json_value(data: bytes) -> Any:
    """The JSON value of ``data``, whole. Raises CorruptValueError for bytes that are
    not UTF-8 JSON."""
    try:
        text = data.decode("utf-8")
        value, end = _SCAN(text, 0)
    except StopIteration as exc:  # the scanner's "no JSON value at this index"
        raise CorruptValueError("stored value is not valid JSON") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptValueError(f"stored value is not valid JSON: {exc}") from exc
    if end != len(text):
        raise CorruptValueError(f"stored value is not valid JSON: extra data at {end}")
    return value


class JsonCodec:
    """Compact JSON (``codec_id`` 1), UTF-8 encoded; the default codec.

    Accepts only JSON types: ``dict`` with ``str`` keys, ``list``, ``tuple``, ``str``,
    ``int``, ``float``, ``bool`` and ``None``. A ``tuple`` is stored as a JSON array and
    so reads back as a ``list``; subclasses of those types read back as the base type.
    Anything else (``bytes``, ``set``, ``datetime``, a ``dict`` with non-``str`` keys,
    NaN or infinity, a circular structure, arrays and objects nested more than
    :attr:`MAX_DEPTH` deep) raises :class:`~cachechain.InvalidValueError` on ``encode``.
    """

    codec_id: int = 1

    #: The deepest nesting of arrays and objects that ``encode`` accepts (``[[1]]`` is 2
    #: deep). The codec checks it itself, so every Python refuses the same values: the
    #: interpreter's own limit is not one (3.10 and 3.11 stop near the recursion limit,
    #: less the caller's stack; 3.12 and 3.13 near C-stack limits of their own, several
    #: thousand deep), and a value written on one must be readable on the others, from
    #: a deep call stack too.
    MAX_DEPTH: Final = 500

    def encode(self, value: Any) -> bytes:
        """Return the compact JSON encoding of ``value``.

        Raises :class:`~cachechain.InvalidValueError` for a value that is not
        made only of JSON types.
        """
        if isinstance(value, _CONTAINERS):
            _check_structure(value, self.MAX_DEPTH)
        return _json_text(value, "JSON")

    def decode(self, data: bytes) -> Any:
        """Return the value encoded in ``data``.

        Raises :class:`CorruptValueError` for bytes that are not UTF-8 JSON.
        """
        return _json_value(data)

    def __repr__(self) -> str:
        return "JsonCodec()"


_CONTAINERS: Final = (dict, list, tuple)


def _check_structure(value: dict[Any, Any] | list[Any] | tuple[Any, ...], max_depth: int) -> None:
    """Raise InvalidValueError if ``value`` is circular, nests arrays and objects more than
    ``max_depth`` deep, or holds a dict with a key that is not a str.

    Iterative, and done before ``json.dumps``, so the limit is the codec's own on every
    Python, and a value of any depth is refused without recursing. ``json.dumps`` would
    silently turn ``int``, ``float``, ``bool`` and ``None`` keys into strings, so
    ``{1: "a"}`` would read back as ``{"1": "a"}``.
    """
    containers = _CONTAINERS
    on_path = {id(value)}  # the containers being walked: one met again is a cycle
    stack = [(value, _children(value))]
    while stack:
        container, children = stack[-1]
        for child in children:
            if isinstance(child, containers):
                if id(child) in on_path:
                    raise InvalidValueError(
                        "value cannot be encoded as JSON: Circular reference detected"
                    )
                if len(stack) >= max_depth:
                    raise InvalidValueError(
                        f"value cannot be encoded as JSON: arrays and objects nested more "
                        f"than {max_depth} deep"
                    )
                on_path.add(id(child))
                stack.append((child, _children(child)))
                break
        else:
            stack.pop()
            on_path.discard(id(container))


def _children(container: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[Any]:
    """An iterator over the values of ``container`` that may be containers (none when
    every value is of a scalar type, told at C speed), after checking that every key of
    a dict is a str."""
    small = len(container) < _WALK_BELOW
    if isinstance(container, dict):
        if small or not _STR.issuperset(map(type, container)):
            for key in container:
                if not isinstance(key, str):
                    raise InvalidValueError(
                        f"JSON object keys must be str, got {type(key).__name__} key {key!r}"
                    )
        values: Iterable[Any] = container.values()
    else:
        values = container
    return iter(values) if small or not _SCALARS.issuperset(map(type, values)) else iter(())


#: Containers shorter than this are walked item by item (cheaper than the sets' test).
_WALK_BELOW: Final = 16
#: Types that are never containers, and the type every JSON object key has.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_STR: Final = frozenset({str})


class TaggedJsonCodec:
    """JSON with tagged types (``codec_id`` 3): the values :class:`JsonCodec` takes,
    read back with their own types (a ``tuple`` stays a ``tuple``, a dict may have
    ``int`` keys), plus ``bytes``, ``bytearray``, ``set``, ``frozenset``, non-finite
    ``float``, ``datetime``, ``date``, ``time`` and ``timedelta``, ``Decimal`` and
    ``UUID`` (see :mod:`cachechain._tagged` for the format and the exact rules).

    Like :class:`JsonCodec`, reading it back only builds those data types, so it is
    safe whoever can write to the cache: no secret is needed. A top-level ``bytes``
    value is stored as it is, after one ``0x00`` byte (no JSON text starts with one),
    so bytes cost no base64. Anything else (instances of other classes, subclasses of
    the types above, a ``datetime`` with a ``zoneinfo`` zone, a circular structure,
    containers nested more than :data:`~cachechain._tagged.MAX_DEPTH` deep) raises
    :class:`~cachechain.InvalidValueError` on ``encode``.
    """

    codec_id: int = 3

    _RAW: Final = b"\x00"

    def encode(self, value: Any) -> bytes:
        """Return the encoding of ``value``: ``0x00`` and the bytes themselves for a
        ``bytes`` value, the compact JSON of its tagged tree otherwise.

        Raises :class:`~cachechain.InvalidValueError` for a value the format cannot
        hold (see the class docstring).
        """
        if value.__class__ is bytes:
            return self._RAW + value
        return _json_text(_tagged.to_tree(value), "tagged JSON")

    def decode(self, data: bytes) -> Any:
        """Return the value encoded in ``data``.

        Raises :class:`CorruptValueError` for bytes that are not this format.
        """
        if data[:1] == self._RAW:
            return bytes(data[1:])
        return _tagged.from_tree(_json_value(data))

    def __repr__(self) -> str:
        return "TaggedJsonCodec()"


#: The length of a context, in front of it in the signed bytes.
_CONTEXT_LENGTH: Final = struct.Struct(">I")


class SignedPickleCodec:
    """Pickle (highest protocol) signed with HMAC-SHA256 (``codec_id`` 2).

    The payload is a 32-byte signature followed by the pickle. The signature covers the
    ``context`` too (see :class:`Codec`): in a layer, the envelope's header (its
    expiry) and the memcached key, so an entry whose expiry was changed or that was
    copied under another key is refused like a forged one. ``decode`` verifies the
    signature with :func:`hmac.compare_digest` before unpickling anything. The signing
    key is derived from ``secret`` for this codec and format only, so a signature made
    elsewhere with the same secret (or by cachechain 0.1, whose signature covered the
    pickle alone) is never accepted here.

    Every process that shares the cache must use the same ``secret`` (``bytes``, or a
    ``str`` taken as UTF-8). Raises :class:`~cachechain.ConfigError` for an
    empty secret or one of another type.
    """

    codec_id: int = 2

    #: Length of the signature at the start of the payload, in bytes.
    SIGNATURE_SIZE = hashlib.sha256().digest_size

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes):
            raise ConfigError(f"secret must be bytes or str, got {type(secret).__name__}")
        if not secret:
            raise ConfigError("secret must not be empty")
        key = hmac.new(secret, b"cachechain.SignedPickleCodec.v2", hashlib.sha256).digest()
        #: The HMAC keyed once; each signature starts from a copy of it.
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def _sign(self, context: bytes, body: bytes) -> bytes:
        """HMAC-SHA256 of the context's length (4 bytes, big-endian), the context and
        the pickle: no two (context, pickle) pairs sign the same bytes."""
        mac = self._mac.copy()
        mac.update(_CONTEXT_LENGTH.pack(len(context)))
        mac.update(context)
        mac.update(body)
        return mac.digest()

    def encode(self, value: Any, *, context: bytes = b"") -> bytes:
        """Return the signature (of ``context`` and the pickle) followed by the pickle
        of ``value``.

        Raises :class:`~cachechain.InvalidValueError` when ``value`` cannot be
        pickled (a lambda, a lock, an open file...).
        """
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # PicklingError, TypeError, AttributeError, RecursionError
            raise InvalidValueError(f"value cannot be pickled: {exc!r}") from exc
        return self._sign(context, data) + data

    def decode(self, data: bytes, *, context: bytes = b"") -> Any:
        """Verify the signature of ``context`` and the pickle, then unpickle.

        Raises :class:`CorruptValueError` for a missing or wrong signature (another
        secret, another context, an older format; nothing is unpickled then), or a
        signed pickle that no longer loads (a class renamed by a deploy, for example).
        """
        size = self.SIGNATURE_SIZE
        if len(data) <= size:
            raise CorruptValueError("signed pickle is truncated (no signature or no data)")
        signature, body = data[:size], data[size:]
        if not hmac.compare_digest(signature, self._sign(context, body)):
            raise CorruptValueError(
                "signed pickle has a bad signature (another secret, key or expiry, or an "
                "older format); not unpickled"
            )
        try:
            return pickle.loads(body)
        except Exception as exc:  # a signed value that no longer loads: treat as a miss
            raise CorruptValueError(f"signed pickle does not load: {exc!r}") from exc

    def __repr__(self) -> str:
        return "SignedPickleCodec(secret=<hidden>)"


#: The first two bytes of a plain envelope of :class:`JsonCodec`: magic and codec id.
_JSON_HEAD: Final = bytes((ENVELOPE_MAGIC, JsonCodec.codec_id))


class Envelope:
    """How a layer wraps the payloads of its ``codec`` (see :func:`pack`); made once
    per layer. When the codec binds its payloads to a context (:func:`binds_context`,
    :attr:`bound`), each payload is bound to the envelope's header and the memcached
    key: the bytes of an entry read back under another key, or with another header,
    are refused.

    Raises :class:`~cachechain.ConfigError` as :func:`check_codec` and
    :func:`binds_context` do.
    """

    __slots__ = ("_bound_codec", "_plain_json", "bound", "codec", "codec_id")

    def __init__(self, codec: Codec) -> None:
        #: The codec.
        self.codec: Codec = check_codec(codec)
        self.codec_id: int = codec.codec_id
        #: Whether payloads are bound to the header and the key.
        self.bound = binds_context(codec)
        self._bound_codec = cast("_BoundCodec", codec) if self.bound else None
        # JsonCodec itself (not a subclass, which may decode otherwise): a batch of
        # its envelopes can be read in one pass (read_plain_many).
        self._plain_json = type(codec) is JsonCodec

    def read_plain(self, data: bytes) -> tuple[Any, float | None] | None:
        """``(value, expires_at)`` of ``data`` if it is a plain envelope (not stamped) of
        :class:`JsonCodec` that :meth:`unpack` reads, read in one step (an L2 hit's
        path: four calls shorter); ``None`` for anything else, which the caller reads
        with :meth:`read` (raising and counting as it does). Never raises."""
        if (
            not self._plain_json
            or data.__class__ is not bytes
            or len(data) <= ENVELOPE_HEADER_SIZE
            or data[0] != ENVELOPE_MAGIC
        ):
            return None
        _, codec_id, stamp = _HEADER.unpack_from(data)
        if codec_id != JsonCodec.codec_id or not 0.0 <= stamp < math.inf:
            return None
        try:
            text = data[ENVELOPE_HEADER_SIZE:].decode("utf-8")
            value, end = _SCAN(text, 0)
        except (StopIteration, ValueError, RecursionError):
            return None
        if end != len(text):
            return None
        return value, stamp or None

    def read_plain_many(
        self, datas: Sequence[bytes], now: float
    ) -> list[tuple[Any, float | None] | Expired | None]:
        """``(value, seconds left at now)`` (``None``: no expiry) of each of ``datas``
        that is a plain envelope (not stamped) of :class:`JsonCodec` with an ASCII
        payload, or :data:`EXPIRED` when its expiry is not after ``now`` (unix
        seconds), read in one pass: one text decoded for the batch, each value scanned
        in place and checked to end exactly where its payload does (what
        :meth:`unpack` accepts, and nothing else). ``None`` for every other item
        (another codec, a stamped or corrupt envelope, a counter, a non-ASCII
        payload): the caller reads those one by one, as before, so that each error is
        raised and counted as :meth:`read` does. Never raises."""
        out: list[tuple[Any, float | None] | Expired | None] = [None] * len(datas)
        if not self._plain_json:
            return out
        stamp_of, size, inf = _STAMP.unpack_from, ENVELOPE_HEADER_SIZE, math.inf
        at: list[tuple[int, int, float]] = []  # (item, payload length, stamp)
        parts: list[bytes] = []
        for i, data in enumerate(datas):
            if data.__class__ is bytes and data.startswith(_JSON_HEAD) and len(data) > size:
                stamp = stamp_of(data, 2)[0]
                if 0.0 <= stamp < inf:
                    at.append((i, len(data) - size, stamp))
                    parts.append(data[size:])
        joined = b"\n".join(parts)
        if not parts or not joined.isascii():
            return out
        text = joined.decode("ascii")
        pos = 0
        for i, n, stamp in at:
            try:
                value, end = _SCAN(text, pos)
            except (StopIteration, ValueError, RecursionError):
                end = -1
            if end == pos + n:
                if stamp > now:
                    out[i] = (value, stamp - now)
                else:  # 0.0: no expiry
                    out[i] = EXPIRED if stamp else (value, None)
            pos += n + 1
        return out

    def pack(
        self,
        value: Any,
        expires_at: float | None,
        key: bytes = b"",
        *,
        fresh_until: float | None = None,
        ttl: float | None = None,
    ) -> bytes:
        """Return the envelope of ``value`` stored under ``key`` (the memcached key):
        header, then the codec's payload.

        ``expires_at`` is the entry's expiry in unix wall-clock seconds, or ``None`` for
        none. With ``fresh_until`` (unix seconds) the envelope is stamped: the entry is
        fresh until then and kept until ``expires_at`` (a fail-safe copy), and ``ttl``
        (seconds) is the TTL it was stored with. Raises
        :class:`~cachechain.InvalidValueError` when the codec cannot encode the value,
        or ``expires_at``, ``fresh_until`` or ``ttl`` is not a finite number > 0.
        """
        if expires_at.__class__ is float and 0.0 < expires_at < math.inf:
            stamp: float = expires_at  # the usual case, checked
        else:
            stamp = check_optional_seconds(expires_at, "expires_at", error=InvalidValueError) or 0.0
        if fresh_until is None:
            header = _HEADER.pack(ENVELOPE_MAGIC, self.codec_id, stamp)
        else:
            fresh = check_seconds(fresh_until, "fresh_until", error=InvalidValueError)
            origin = check_seconds(ttl, "ttl", error=InvalidValueError)
            header = _STAMPED_HEADER.pack(STAMPED_MAGIC, self.codec_id, stamp, fresh, origin)
        bound = self._bound_codec
        if bound is not None:
            return header + bound.encode(value, context=header + key)
        return header + self.codec.encode(value)

    def unpack(self, data: bytes, key: bytes = b"") -> tuple[Any, float | None]:
        """Return ``(value, expires_at)`` from the envelope ``data`` read under ``key``.

        ``expires_at`` is unix wall-clock seconds, or ``None`` for an entry that does not
        expire; the caller decides whether it has passed. For a stamped envelope it is
        the logical expiry (``fresh_until``: see :meth:`read`). Raises
        :class:`CorruptValueError` for truncated data, a wrong magic byte, a codec id
        other than this codec's (a JSON reader never unpickles; a pickle reader never
        trusts unsigned data), an invalid expiry, or a payload the codec rejects (for a
        bound codec: one not bound to this header and ``key``).
        """
        value, _, fresh_until, _ = self.read(data, key)
        return value, fresh_until

    def read(
        self, data: bytes, key: bytes = b""
    ) -> tuple[Any, float | None, float | None, float | None]:
        """Return ``(value, expires_at, fresh_until, ttl)`` from the envelope ``data``
        read under ``key``: when the entry is gone (``None``: never), when it stops
        being fresh (the same for an envelope that is not stamped) and the TTL a
        stamped entry was stored with (``None`` for one that is not). Raises
        :class:`CorruptValueError` as :meth:`unpack` does, and for a stamped header
        whose ``fresh_until`` or ``ttl`` is not a finite number > 0."""
        codec_id, expires_at, fresh_until, ttl, size = _header(data)
        if codec_id != self.codec_id:
            raise CorruptValueError(
                f"stored value was written by codec {codec_id}, this layer reads {self.codec_id}"
            )
        bound = self._bound_codec
        if bound is not None:
            value = bound.decode(data[size:], context=data[:size] + key)
        else:
            value = self.codec.decode(data[size:])
        return value, expires_at, fresh_until, ttl

    def restamp(
        self, data: bytes, expires_at: float | None, key: bytes = b""
    ) -> tuple[bytes, float | None]:
        """Return the envelope ``data`` (read under ``key``) with its expiry replaced by
        ``expires_at`` (unix seconds, ``None`` for none), and the expiry it had (a
        stamped envelope's logical one; the result is not stamped). The
        payload of a codec that does not bind it is kept as it is, neither decoded nor
        checked (see :func:`restamp`); a bound payload is verified (:meth:`unpack`)
        and encoded again for the new header. Raises :class:`CorruptValueError` as
        :meth:`unpack` does (for an unbound payload: as :func:`restamp`), and
        :class:`~cachechain.InvalidValueError` for an ``expires_at`` that is not a
        finite number > 0."""
        if self._bound_codec is None:
            return restamp(data, expires_at)
        value, old = self.unpack(data, key)
        return self.pack(value, expires_at, key), old

    def __repr__(self) -> str:
        return f"Envelope({self.codec!r})"


def pack(codec: Codec, value: Any, expires_at: float | None, key: bytes = b"") -> bytes:
    """Return the envelope of ``value``: header, then ``codec.encode(value)`` (bound to
    the header and ``key`` for a codec that binds its payloads, see :class:`Envelope`).

    ``expires_at`` is the entry's expiry in unix wall-clock seconds, or ``None`` for
    none. Raises :class:`~cachechain.InvalidValueError` when the codec cannot
    encode the value or ``expires_at`` is not a finite number > 0.
    """
    return Envelope(codec).pack(value, expires_at, key)


def unpack(codec: Codec, data: bytes, key: bytes = b"") -> tuple[Any, float | None]:
    """Return ``(value, expires_at)`` from an envelope made by :func:`pack` (with the
    same ``key``); see :meth:`Envelope.unpack`, which a layer calls, for the errors."""
    return Envelope(codec).unpack(data, key)


def restamp(data: bytes, expires_at: float | None) -> tuple[bytes, float | None]:
    """Return ``data`` (an envelope made by :func:`pack`) with its expiry replaced by
    ``expires_at`` (unix seconds, ``None`` for none), and the expiry it had (for a
    stamped envelope, its logical expiry; the result is not stamped: the entry is
    fresh until ``expires_at``). The
    payload is neither decoded nor checked (nothing is unpickled), so this is only for
    a codec that does not bind its payloads (a bound one no longer verifies: use
    :meth:`Envelope.restamp`). Raises
    :class:`CorruptValueError` for bytes that are not an envelope (too short, a wrong
    magic byte, an invalid expiry), and :class:`~cachechain.InvalidValueError` for an
    ``expires_at`` that is not a finite number > 0."""
    codec_id, _, fresh_until, _, size = _header(data)
    new = check_optional_seconds(expires_at, "expires_at", error=InvalidValueError) or 0.0
    header = _HEADER.pack(ENVELOPE_MAGIC, codec_id, new)
    return header + data[size:], fresh_until


def expiry_of(data: bytes) -> float | None:
    """The expiry (unix seconds, ``None`` for none) of the envelope ``data`` as readers
    see it (a stamped envelope's logical expiry), read from its header alone. Raises
    :class:`CorruptValueError` as :func:`restamp` does."""
    return _header(data)[2]


def kept_until(data: bytes) -> tuple[float | None, bool]:
    """``(expires_at, stamped)`` of the envelope ``data``, read from its header alone:
    until when the entry is kept (unix seconds, ``None`` for ever; for a stamped
    envelope, a fail-safe copy, its physical expiry, past its logical one) and whether
    it is stamped. Raises :class:`CorruptValueError` as :func:`expiry_of` does."""
    _, expires_at, _, origin, _ = _header(data)
    return expires_at, origin is not None


def _header(data: bytes) -> tuple[int, float | None, float | None, float | None, int]:
    """``(codec_id, expires_at, fresh_until, ttl, header size)`` of an envelope's
    header (``fresh_until`` is ``expires_at`` and ``ttl`` None unless it is stamped);
    raises CorruptValueError."""
    if len(data) < ENVELOPE_HEADER_SIZE:
        raise CorruptValueError(f"stored value is truncated ({len(data)} bytes)")
    magic, codec_id, stamp = _HEADER.unpack_from(data)
    if magic != ENVELOPE_MAGIC and magic != STAMPED_MAGIC:
        raise CorruptValueError(f"stored value has an unknown envelope (magic 0x{magic:02x})")
    if not math.isfinite(stamp) or stamp < 0:
        raise CorruptValueError(f"stored value has an invalid expiry {stamp!r}")
    expires_at = stamp if stamp else None
    if magic == ENVELOPE_MAGIC:
        return codec_id, expires_at, expires_at, None, ENVELOPE_HEADER_SIZE
    if len(data) < STAMPED_HEADER_SIZE:
        raise CorruptValueError(f"stored value is truncated ({len(data)} bytes)")
    _, _, _, fresh_until, ttl = _STAMPED_HEADER.unpack_from(data)
    for number in (fresh_until, ttl):
        if not math.isfinite(number) or number <= 0:
            raise CorruptValueError(f"stored value has an invalid stamp {number!r}")
    return codec_id, expires_at, fresh_until, ttl, STAMPED_HEADER_SIZE
