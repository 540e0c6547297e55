"""Tagged JSON trees: Python values beyond JSON's types, as JSON values and back.

:func:`to_tree` turns a value into a tree of JSON types that :func:`from_tree` turns
back into an equal value of the same types; :class:`~cachechain.TaggedJsonCodec` stores
such trees. Reading a tree back builds only the data types below: it never imports
or calls anything else, so a tree written by whoever can write to the cache is safe to
read (unlike a pickle).

A value of a JSON type is its own tree (``str``, ``int``, ``bool``, ``None``, a finite
``float``, a ``list``, and a ``dict`` whose keys are all ``str``). Any other value of a
type below is a *tag*: a JSON object with exactly one key, the tag's name::

    " b"   bytes             base64 text            " t"   tuple      list of trees
    " ba"  bytearray         base64 text            " s"   set        list of trees
    " f"   float, not finite "nan", "inf", "-inf"   " fs"  frozenset  list of trees
    " dt"  datetime          isoformat text         " d"   dict       [[key, value], ...]
    " da"  date              isoformat text         " dec" Decimal    str(value)
    " tm"  time              isoformat text         " u"   UUID       32 hex digits
    " td"  timedelta         [days, seconds, microseconds]

A ``dict`` is a ``" d"`` tag when one of its keys is not a ``str``, and also when it
has one key only and that key is a tag's name (so that it is never read as a tag).
Types are exact: a subclass (an ``OrderedDict``, a named tuple, an ``IntEnum``, a
``str`` subclass) is refused rather than read back as its base type, and so are
datetimes and times whose ``tzinfo`` is not a fixed offset (``datetime.timezone``:
a ``zoneinfo`` zone would come back as an offset).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import math
import uuid
from collections.abc import Callable
from typing import Any, Final

from ._errors import CorruptValueError, InvalidValueError

__all__ = ["MAX_DEPTH", "TAGS", "from_tree", "to_tree"]

#: The deepest nesting of containers (``list``, ``tuple``, ``dict``, ``set``,
#: ``frozenset``) that :func:`to_tree` accepts and :func:`from_tree` reads. Each level
#: may take two JSON levels (a tag and its list), and JSON parsers and encoders recurse:
#: 100 stays well within every supported Python's limits, from a deep call stack too.
MAX_DEPTH: Final = 100

_JSON_SCALARS: Final = (str, int, bool, type(None))


def _fail(message: str) -> InvalidValueError:
    return InvalidValueError(f"value cannot be encoded as tagged JSON: {message}")


def _check_tz(value: dt.datetime | dt.time) -> None:
    tz = value.tzinfo
    if tz is not None and type(tz) is not dt.timezone:
        raise _fail(f"{type(value).__name__} with tzinfo {tz!r} (only fixed offsets)")


def _datetime(value: dt.datetime) -> Any:
    _check_tz(value)
    return value.isoformat()


def _time(value: dt.time) -> Any:
    _check_tz(value)
    return value.isoformat()


def _float(value: float) -> Any:
    return value if math.isfinite(value) else {" f": repr(value)}


#: Tag name and encoder of the scalar types that are not JSON's.
_SCALARS: Final[dict[type, tuple[str, Callable[[Any], Any]]]] = {
    bytes: (" b", lambda v: base64.b64encode(v).decode("ascii")),
    bytearray: (" ba", lambda v: base64.b64encode(v).decode("ascii")),
    dt.datetime: (" dt", _datetime),
    dt.date: (" da", dt.date.isoformat),
    dt.time: (" tm", _time),
    dt.timedelta: (" td", lambda v: [v.days, v.seconds, v.microseconds]),
    decimal.Decimal: (" dec", str),
    uuid.UUID: (" u", lambda v: v.hex),
}

#: Tag name of each container type that is not JSON's.
_SEQUENCES: Final[dict[type, str]] = {tuple: " t", set: " s", frozenset: " fs"}

#: Every tag's name.
TAGS: Final = frozenset(
    {*(name for name, _ in _SCALARS.values()), *_SEQUENCES.values(), " f", " d"}
)


def to_tree(value: Any) -> Any:
    """Return the tagged JSON tree of ``value`` (see the module docstring); new
    containers throughout, so the tree shares no mutable part with ``value``.

    Raises :class:`~cachechain.InvalidValueError` for a value (or a part of one) of
    another type, a circular structure, or containers nested more than
    :data:`MAX_DEPTH` deep.
    """
    return _to_tree(value, 0, set())


def _to_tree(value: Any, depth: int, path: set[int]) -> Any:
    kind = type(value)
    if kind in _JSON_SCALARS:
        return value
    if kind is float:
        return _float(value)
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        name, encode = scalar
        return {name: encode(value)}
    if kind not in (list, dict) and kind not in _SEQUENCES:
        raise _fail(f"{kind.__module__}.{kind.__qualname__} is not a supported type")
    if depth >= MAX_DEPTH:
        raise _fail(f"containers nested more than {MAX_DEPTH} deep")
    if id(value) in path:
        raise _fail("circular reference")
    path.add(id(value))
    try:
        return _container(value, kind, depth + 1, path)
    finally:
        path.discard(id(value))


def _container(value: Any, kind: type, depth: int, path: set[int]) -> Any:
    if kind is dict:
        if _plain_keys(value):
            return {k: _to_tree(v, depth, path) for k, v in value.items()}
        pairs = [[_to_tree(k, depth, path), _to_tree(v, depth, path)] for k, v in value.items()]
        return {" d": pairs}
    items = [_to_tree(item, depth, path) for item in value]
    return items if kind is list else {_SEQUENCES[kind]: items}


def _plain_keys(value: dict[Any, Any]) -> bool:
    """Whether a dict can be a JSON object as it is: every key an exact ``str``, and
    not one key only that is a tag's name."""
    if len(value) == 1:
        key = next(iter(value))
        return type(key) is str and key not in TAGS
    return all(type(key) is str for key in value)


def _b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"base64 text expected, got {type(text).__name__}")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _timedelta(parts: Any) -> dt.timedelta:
    if not (isinstance(parts, list) and len(parts) == 3 and all(type(p) is int for p in parts)):
        raise TypeError(f"[days, seconds, microseconds] expected, got {parts!r:.80}")
    days, seconds, microseconds = parts
    return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _special_float(text: Any) -> float:
    if text not in ("nan", "inf", "-inf"):
        raise ValueError(f"'nan', 'inf' or '-inf' expected, got {text!r:.80}")
    return float(text)


def _iso(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def read(text: Any) -> Any:
        if not isinstance(text, str):
            raise TypeError(f"isoformat text expected, got {type(text).__name__}")
        return parse(text)

    return read


def _uuid(text: Any) -> uuid.UUID:
    if not isinstance(text, str):
        raise TypeError(f"hex text expected, got {type(text).__name__}")
    return uuid.UUID(hex=text)


def _decimal(text: Any) -> decimal.Decimal:
    if not isinstance(text, str):
        raise TypeError(f"decimal text expected, got {type(text).__name__}")
    return decimal.Decimal(text)


#: How each scalar tag is read back.
_READ_SCALAR: Final[dict[str, Callable[[Any], Any]]] = {
    " b": _b64,
    " ba": lambda text: bytearray(_b64(text)),
    " f": _special_float,
    " dt": _iso(dt.datetime.fromisoformat),
    " da": _iso(dt.date.fromisoformat),
    " tm": _iso(dt.time.fromisoformat),
    " td": _timedelta,
    " dec": _decimal,
    " u": _uuid,
}

#: How each sequence tag is read back, from the list of its items.
_READ_SEQUENCE: Final[dict[str, Callable[[list[Any]], Any]]] = {
    " t": tuple,
    " s": set,
    " fs": frozenset,
}


def from_tree(tree: Any) -> Any:
    """Return the value whose tagged JSON tree is ``tree`` (as :func:`to_tree` made
    it, parsed from JSON).

    Raises :class:`~cachechain.CorruptValueError` for a tree that no value has (an
    unknown or malformed tag, an unhashable key, containers nested more than
    :data:`MAX_DEPTH` deep).
    """
    try:
        return _from_tree(tree, 0)
    except CorruptValueError:
        raise
    except (TypeError, ValueError, OverflowError, binascii.Error, decimal.InvalidOperation) as exc:
        raise CorruptValueError(f"stored value is not valid tagged JSON: {exc}") from exc


def _from_tree(tree: Any, depth: int) -> Any:
    """The value of ``tree``, found inside ``depth`` containers: each container of
    the value (a list, a plain object, a tag with a list) counts one, as in
    :func:`to_tree`."""
    kind = type(tree)
    if kind is list:
        _enter(depth)
        return [_from_tree(item, depth + 1) for item in tree]
    if kind is not dict:
        return tree  # a JSON scalar
    if len(tree) == 1:
        ((name, inner),) = tree.items()
        if name in TAGS:
            return _from_tag(name, inner, depth)
    _enter(depth)
    return {key: _from_tree(value, depth + 1) for key, value in tree.items()}


def _from_tag(name: str, inner: Any, depth: int) -> Any:
    read = _READ_SCALAR.get(name)
    if read is not None:
        return read(inner)
    if type(inner) is not list:
        raise TypeError(f"tag {name!r} holds {type(inner).__name__}, not a list")
    _enter(depth)
    if name == " d":
        pairs = (_pair(item) for item in inner)
        return {_from_tree(k, depth + 1): _from_tree(v, depth + 1) for k, v in pairs}
    return _READ_SEQUENCE[name]([_from_tree(item, depth + 1) for item in inner])


def _pair(item: Any) -> tuple[Any, Any]:
    if type(item) is not list or len(item) != 2:
        raise TypeError(f"a [key, value] pair expected, got {item!r:.80}")
    return item[0], item[1]


def _enter(depth: int) -> None:
    """Raise CorruptValueError when a container at ``depth`` is one too deep."""
    if depth >= MAX_DEPTH:
        raise CorruptValueError(
            f"stored value is not valid tagged JSON: containers nested more than {MAX_DEPTH} deep"
        )
