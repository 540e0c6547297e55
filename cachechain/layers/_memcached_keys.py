"""Memcached keys: how a cache key becomes the key memcached stores it under.

A key that memcached's text protocol could misread (spaces, CR/LF, control characters,
non-ASCII, too long) is never sent raw: see :func:`memcached_key`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from .._errors import ConfigError
from .._validate import check_key

__all__ = [
    "HASHED_KEY_MARKER",
    "MAX_KEY_LENGTH",
    "MAX_PREFIX_LENGTH",
    "check_prefix",
    "map_key",
    "map_many",
    "memcached_key",
    "raw_key",
]

#: The longest key memcached accepts, in bytes.
MAX_KEY_LENGTH = 250
#: The longest ``key_prefix`` accepted, in bytes.
MAX_PREFIX_LENGTH = 64
#: Marks a hashed key: follows the prefix in every hashed key, never starts a raw one.
HASHED_KEY_MARKER = "~"

#: A key sent raw: printable ASCII without space, not starting with the marker.
_RAW_KEY = re.compile(r"[!-}][!-~]*")
_PREFIX = re.compile(r"(?:[!-}][!-~]*)?")
#: A match when a ``str`` key of the right length is sent raw (``prefix + key``):
#: printable ASCII without space, not starting with the marker (see :func:`map_key`).
raw_key = _RAW_KEY.fullmatch
#: A batch of keys joined by spaces, each of them sent raw on its own (see map_many),
#: and, after a raw prefix, each of them sent raw after it (any printable ASCII).
_RAW_BATCH = re.compile(r"[!-}][!-~]*(?: [!-}][!-~]*)*").fullmatch
_RAW_TAILS = re.compile(r"[!-~]*(?: [!-~]*)*").fullmatch


def check_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a valid ``key_prefix``: at most 64 printable ASCII
    characters without spaces, not starting with ``~``. Raises
    :class:`~cachechain.ConfigError` naming ``key_prefix`` otherwise."""
    if not isinstance(prefix, str):
        raise ConfigError(f"key_prefix must be a str, got {type(prefix).__name__}")
    if len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            "key_prefix must be at most 64 printable ASCII characters without spaces, "
            f"not starting with {HASHED_KEY_MARKER!r}; got {prefix!r}"
        )
    return prefix


def map_key(key: str, prefix: str) -> bytes:
    """The mapping of :func:`memcached_key`, for a ``prefix`` already checked by
    :func:`check_prefix` (every read and write maps its keys through here). Raises
    :class:`~cachechain.InvalidKeyError` when ``key`` is not a ``str``."""
    if not isinstance(key, str):
        check_key(key)
    if str.__len__(key) + len(prefix) <= MAX_KEY_LENGTH and _RAW_KEY.fullmatch(key):
        return (prefix + key).encode("ascii")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    hashed = base64.urlsafe_b64encode(digest).rstrip(b"=")
    return (prefix + HASHED_KEY_MARKER).encode("ascii") + hashed


def map_many(keys: Iterable[str], prefix: str, inner: str = "") -> dict[bytes, str]:
    """``{memcached key: key}`` for ``keys`` as :func:`map_key` maps ``inner + key``
    (a key given twice is in it once). ``inner`` is a prefix the caller adds to each
    key before it is mapped (a namespace generation); the result still maps back to
    ``key``. A batch whose keys are all sent raw (the usual one) is checked and encoded
    in one pass over the keys joined by spaces (:func:`_map_raw`: a fifth of the cost
    of a loop); any other goes key by key. Raises :class:`~cachechain.InvalidKeyError`
    when a key is not a ``str``."""
    batch = keys if isinstance(keys, list) else list(keys)
    raw = _map_raw(batch, prefix, inner)
    if raw is not None:
        return raw
    fullmatch, limit = _RAW_KEY.fullmatch, MAX_KEY_LENGTH - len(prefix)
    mapped: dict[bytes, str] = {}
    for key in batch:
        if key.__class__ is not str and not isinstance(key, str):
            check_key(key)  # raises
        full = inner + key
        if len(full) <= limit and fullmatch(full):
            mapped[(prefix + full).encode("ascii")] = key
        else:
            mapped[map_key(full, prefix)] = key
    return mapped


def _map_raw(keys: list[str], prefix: str, inner: str) -> dict[bytes, str] | None:
    """:func:`map_many` of ``keys`` when every one is sent raw (``prefix + inner +
    key``), else None (a key that is not a ``str``, must be hashed, or holds a space).

    The keys are joined by spaces, which no raw key holds: one ``str.join``, one count
    of the spaces (a key holding one would add to it), one regular expression over the
    whole and the longest key's length check what :func:`map_key` checks of each key;
    one ``encode`` and one ``split`` make the memcached keys."""
    if not keys:
        return {}
    try:
        joined = " ".join(keys)
    except TypeError:  # a key that is not a str: map_many's loop raises
        return None
    if joined.count(" ") != len(keys) - 1:
        return None
    if inner:  # every key follows a raw inner prefix: any printable ASCII tail is raw
        if _RAW_KEY.fullmatch(inner) is None or _RAW_TAILS(joined) is None:
            return None
    elif _RAW_BATCH(joined) is None:
        return None
    whole = prefix + inner
    # str's own length, not a subclass's __len__ (map_key measures inner + key, a str)
    if max(map(str.__len__, keys)) > MAX_KEY_LENGTH - len(whole):
        return None
    sep = " " + whole
    mkeys = (whole + joined.replace(" ", sep) if whole else joined).encode("ascii").split(b" ")
    return dict(zip(mkeys, keys, strict=True))


def memcached_key(key: str, prefix: str = "") -> bytes:
    """Return the memcached key under which ``key`` is stored, as bytes.

    A key of printable ASCII (0x21-0x7e) that does not start with ``~`` and fits in
    250 bytes with ``prefix`` is sent as ``prefix + key``. Every other ``str`` (empty,
    with spaces, CR/LF, tabs, NUL or other control characters, non-ASCII, too long, or
    starting with ``~``) is sent as ``prefix + "~" + urlsafe_b64(sha256(utf8(key)))``
    without padding (43 characters). The mapping is the same in every process, distinct
    keys never share a memcached key (barring a SHA-256 collision), and the result is
    always safe for the text protocol.

    Raises :class:`~cachechain.InvalidKeyError` when ``key`` is not a ``str``,
    and :class:`~cachechain.ConfigError` for an invalid ``prefix`` (at most 64
    printable ASCII characters, not starting with ``~``).
    """
    return map_key(key, check_prefix(prefix))
