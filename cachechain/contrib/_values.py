"""How the Django and Flask backends store values in their chain: the value forms.

Values are copies, as in every Django and Flask-Caching backend: ``str``, ``int``,
``float``, ``bool`` and ``None`` are stored as they are (immutable; memcached counters
need ``int``), any other value in a serialized form that each read turns into a fresh
object. Which form depends on the codecs of the chain's remote layers
(:func:`cachechain.contrib._form_of`):

- :data:`PICKLED` (every remote layer signs: the signed pickle codec the backend gives
  memcached with the application's secret, or one named explicitly; in-process-only
  chains): the pickle of the value, as ``bytes``. Memcached's codec signs it, and
  nothing read from memcached is unpickled unless its signature checks out.
- :data:`TAGGED` (any other remote codec: :class:`~cachechain.TaggedJsonCodec` given
  because the application has no secret, or ``json``, ``tagged_json`` or a codec of the
  application's named explicitly): the value's tagged JSON (:mod:`cachechain._tagged`),
  as ``bytes``; reading it never runs code, so nothing from memcached is ever
  unpickled. A value tagged JSON cannot hold (an instance of an application class, a
  ``Response``) is pickled into a :class:`LocalOnly` that memcached's codec refuses: it
  stays in the in-process layers (the chain counts memcached's refusal).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any, Final

from .._chain import Chain
from .._codecs import TaggedJsonCodec
from .._errors import CorruptValueError, InvalidValueError
from .._logonce import LogOnce
from ..layers._base import MISSING

__all__ = ["PICKLED", "TAGGED", "LocalOnly", "ValueForm"]

log = logging.getLogger("cachechain.contrib")

#: Values stored as they are; any other value is stored serialized.
_PLAIN: Final = frozenset({str, int, float, bool, type(None)})

_PICKLE_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL

#: Logs each kind of decoding error at WARNING once, then at DEBUG.
_log_once = LogOnce(log)


def _pickle(value: Any) -> bytes:
    """The pickle of ``value``. Raises :class:`pickle.PicklingError` for a value that
    cannot be pickled (as Django and Flask-Caching do)."""
    try:
        return pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
    except Exception as exc:  # PicklingError, TypeError, AttributeError, RecursionError
        raise pickle.PicklingError(
            f"cannot cache a {type(value).__name__}: it cannot be pickled ({exc!r})"
        ) from exc


def _unreadable(exc: Exception, what: str) -> Any:
    """Log a stored value that no longer decodes (once per error type); a miss."""
    kind = type(exc).__name__
    _log_once(
        (what, kind),
        "a cached value could not be %s (%s: %s); treated as a miss. "
        "Further %s errors are logged at DEBUG",
        what,
        kind,
        exc,
        kind,
    )
    return MISSING


def _unpickle(data: bytes) -> Any:
    """The object pickled in ``data`` (made by this process, or checked by a signed
    codec), or MISSING when it no longer loads (a class renamed by a deploy)."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        return _unreadable(exc, "unpickled")


class LocalOnly:
    """A pickled value that must not leave this process (:data:`TAGGED`): no codec
    encodes it (JSON cannot, and it refuses to be pickled), so only the in-process
    layers hold it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        """Refused: a pickle codec (``SignedPickleCodec``, an application's) would
        carry it to another process, which could take it for a value (found by
        review: a signed layer beside a JSON one). Raises ``TypeError``."""
        raise TypeError("a LocalOnly value stays in this process: it cannot be pickled")

    def __repr__(self) -> str:
        return f"LocalOnly(<{len(self.data)} bytes of pickle>)"


class ValueForm:
    """How a backend turns values into what its chain stores, and back."""

    def encode(self, value: Any) -> Any:
        """What the chain stores for ``value``: the value itself when it is a plain
        immutable (``str``, ``int``, ``float``, ``bool``, ``None``), else its serialized
        form. Raises :class:`pickle.PicklingError` for a value that cannot be stored."""
        raise NotImplementedError

    def decode(self, stored: Any) -> Any:
        """The value that :meth:`encode` stored (a fresh object), or
        :data:`~cachechain.MISSING` when it can no longer be read (logged at WARNING
        once per error type, then at DEBUG)."""
        raise NotImplementedError

    def read(self, chain: Chain, key: str, default: Any) -> Any:
        """The value cached under ``key`` in ``chain`` (a fresh copy), or ``default``
        on a miss and for a stored value that can no longer be read."""
        stored = chain.get(key, MISSING)
        if stored is MISSING:
            return default
        value = self.decode(stored)
        return default if value is MISSING else value


class _Pickled(ValueForm):
    """Plain values as they are, any other as its pickle (``bytes``)."""

    def encode(self, value: Any) -> Any:
        if value.__class__ in _PLAIN:
            return value
        return _pickle(value)

    def decode(self, stored: Any) -> Any:
        kind = stored.__class__
        if kind is bytes:
            return _unpickle(stored)
        if kind is LocalOnly:  # another form's, from elsewhere: never this one's
            return MISSING
        return stored

    def __repr__(self) -> str:
        return "PICKLED"


class _Tagged(ValueForm):
    """Plain values as they are, any other as its tagged JSON (``bytes``), or pickled
    into a :class:`LocalOnly` when tagged JSON cannot hold it."""

    _codec: Final = TaggedJsonCodec()

    def encode(self, value: Any) -> Any:
        if value.__class__ in _PLAIN:
            return value
        try:
            return self._codec.encode(value)
        except InvalidValueError:
            return LocalOnly(_pickle(value))

    def decode(self, stored: Any) -> Any:
        kind = stored.__class__
        if kind is bytes:
            try:
                return self._codec.decode(stored)
            except CorruptValueError as exc:
                return _unreadable(exc, "decoded")
        if kind is LocalOnly:
            return _unpickle(stored.data)
        return stored

    def __repr__(self) -> str:
        return "TAGGED"


#: Pickles (the signed pickle codec, or a codec of the application's, in memcached).
PICKLED: Final[ValueForm] = _Pickled()
#: Tagged JSON (:class:`~cachechain.TaggedJsonCodec` in memcached: no secret).
TAGGED: Final[ValueForm] = _Tagged()
