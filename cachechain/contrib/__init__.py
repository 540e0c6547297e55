"""Framework integrations: cachechain as a Django cache backend and a Flask-Caching backend.

- :mod:`cachechain.contrib.django`: :class:`~cachechain.contrib.django.CachechainCache`,
  used through ``CACHES = {"default": {"BACKEND":
  "cachechain.contrib.django.CachechainCache", "LOCATION": "host:port"}}`` (the default
  set-up) or ``"OPTIONS": {"layers": [...]}``.
- :mod:`cachechain.contrib.flask`: :class:`~cachechain.contrib.flask.CachechainBackend`,
  used through ``CACHE_TYPE = "cachechain.contrib.flask.CachechainBackend"`` and
  ``CACHE_OPTIONS = {...}``.

In both, the options are the mapping of :func:`cachechain.chain_config_from_mapping`
(``layers``, ``breaker``, ``writer``, ``metrics``, ``name``, ``coherence``). What the two
backends share, and why:

- **Values are copies, as in every Django and Flask-Caching backend.** ``str``, ``int``,
  ``float``, ``bool`` and ``None`` are stored as they are (immutable, and JSON can carry
  them to memcached); any other value is serialized when it is stored (pickled; tagged
  JSON when memcached has :class:`~cachechain.TaggedJsonCodec`, see
  :mod:`cachechain.contrib._values`) and deserialized when it is read, so every read
  returns a fresh object. A cached ``HttpResponse`` or Flask ``Response`` that
  middleware or ``after_request`` handlers mutate (headers, cookies) therefore never
  changes what the next request gets. A value that cannot be pickled raises
  :class:`pickle.PicklingError`, as both frameworks document; a stored value that can
  no longer be read (its class was renamed in a deploy) is a miss, logged once.
- **Memcached gets a signed pickle codec by default.** A ``memcached`` layer that names
  no ``codec`` is given :class:`~cachechain.SignedPickleCodec` keyed by the
  application's ``SECRET_KEY``: those frameworks cache arbitrary picklable objects, and
  nothing read from memcached is unpickled unless its HMAC signature checks out. Every
  process sharing the memcached must use the same ``SECRET_KEY``; after a change of
  ``SECRET_KEY`` older entries are misses. Without a secret (a Flask app without
  ``SECRET_KEY``) the layer gets :class:`~cachechain.TaggedJsonCodec` instead: it
  holds JSON values, ``bytes``, tuples, sets, dates and times, ``Decimal`` and
  ``UUID``, and nothing read from memcached is unpickled; other values stay in the
  in-process layers. A layer with an explicit ``"codec": "json"`` stores only the
  plain values above; the others stay in the layers that can hold them. Values are
  pickled only when every remote layer signs (:func:`_form_of`): with any other codec
  (``json``, ``tagged_json``, the application's own) they are stored as tagged JSON, so
  bytes that someone else wrote to memcached are never unpickled.
- **"Never expires"** is stored as :data:`NO_EXPIRY_TTL` seconds (ten years): the
  layers take finite TTLs. Each layer's ``max_ttl`` still caps every TTL.
- **clear() clears the cache for every process** sharing the memcached
  (:meth:`Chain.clear <cachechain.Chain.clear>`): the namespace generation stored in
  memcached moves, so no process reads an older entry again, and the in-process layers
  of the others drop theirs within the coherence bound (100 ms). Other applications'
  keys on the same servers are untouched; ``backend.chain.clear(flush=True)`` runs
  memcached's ``flush_all``, as Django's own memcached backends do in ``clear()``.
- **add, incr and decr are atomic across processes.** They run on the chain's shared
  layer (memcached): ``add`` is memcached's ``add`` (exactly one process wins a key, so
  it works as a lock), ``incr``/``decr`` memcached's counters, so no update is lost
  between workers. Counters are signed 64-bit integers and may go below 0, as these
  frameworks' generic backends allow. While memcached cannot be reached nothing is
  made up: ``add`` stores nothing and returns False, a count is not returned (see each
  backend). On a stored value that is not a counter (a float, ``None``...), ``incr``
  does what the framework does, read then write, not atomically.
- The chains these backends build are closed (their queued writes drained) when the
  interpreter exits.
"""

from __future__ import annotations

import atexit
import operator
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .. import _fork
from .._chain import Chain
from .._codecs import SignedPickleCodec, TaggedJsonCodec
from .._errors import InvalidValueError
from .._namespace import BOOKKEEPING_TTL
from .._resilience import unwrapped
from ..layers._base import MISSING
from ._values import PICKLED, TAGGED, ValueForm, log

__all__ = ["NO_EXPIRY_TTL", "log"]

#: The TTL, in seconds (ten years), that stands for "never expires" (Django's
#: ``timeout=None``, Flask-Caching's ``timeout=0``).
NO_EXPIRY_TTL: Final[float] = BOOKKEEPING_TTL  # the one "never" of the project


def _add(chain: Chain, key: str, stored: Any, ttl: float | None) -> bool:
    """Store ``stored`` for ``ttl`` seconds unless the chain's shared layer holds
    ``key`` (:meth:`Chain.add <cachechain.Chain.add>`: atomic across processes; False
    also when that layer cannot be reached). With ``ttl`` None ("do not cache")
    nothing is stored, and the answer is whether ``key`` is absent."""
    if ttl is None:
        return chain.get(key, MISSING) is MISSING
    return chain.add(key, stored, ttl)


#: What :func:`_count` returns when the stored value is not a counter.
NOT_A_COUNTER: Final[Any] = object()
_DELTA_BOUND: Final = 1 << 64


def _count(chain: Chain, key: str, delta: Any, *, strict: bool = False) -> Any:
    """Add ``delta`` (any ``int``: a negative one subtracts, and the counter may go
    below 0) to the counter ``key`` on the chain's shared layer, atomically across
    processes (:meth:`Chain.incr <cachechain.Chain.incr>`, or :meth:`Chain.decr
    <cachechain.Chain.decr>` with ``floor=False``). Return the new value; None when the
    key is absent or (unless ``strict``: then :class:`~cachechain.UnconfirmedError`)
    the shared layer cannot be reached; :data:`NOT_A_COUNTER` when the stored value
    cannot be a counter (nothing changed). Raises :class:`TypeError` for a ``delta``
    that is not an integer and :class:`ValueError` for one of 2**64 or more either
    way."""
    delta = operator.index(delta)
    if not -_DELTA_BOUND < delta < _DELTA_BOUND:
        raise ValueError(f"delta must be in (-2**64, 2**64), got {delta!r}")
    try:
        if delta >= 0:
            return chain.incr(key, delta, strict=strict)
        return chain.decr(key, -delta, floor=False, strict=strict)
    except InvalidValueError:
        return NOT_A_COUNTER


def _delete(chain: Chain, key: str) -> bool:
    """Remove ``key`` from every layer; return True when it was cached and every layer
    confirmed the delete."""
    existed = chain.get(key, MISSING) is not MISSING
    return chain.delete(key) and existed


def _layer_entries(options: Mapping[str, Any]) -> Sequence[Any]:
    """The ``layers`` entries of ``options``; none when they are malformed (the
    settings report that)."""
    layers = options.get("layers")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        return ()
    return layers


def _wants_default_codec(entry: Any) -> bool:
    """Whether a ``layers`` entry is a ``memcached`` layer that names no ``codec``."""
    return isinstance(entry, Mapping) and entry.get("type") == "memcached" and "codec" not in entry


def _needs_default_codec(options: Mapping[str, Any]) -> bool:
    """Whether some ``memcached`` layer of ``options`` names no codec (and so gets the
    default one, keyed by the application's secret)."""
    return any(_wants_default_codec(entry) for entry in _layer_entries(options))


def _with_default_codec(
    options: Mapping[str, Any], secret: str | bytes | None
) -> tuple[Mapping[str, Any], list[str]]:
    """Return ``options`` with a codec given to every ``memcached`` layer that names no
    ``codec``, and the names of those layers that got tagged JSON. With a ``secret``,
    the codec is a :class:`~cachechain.SignedPickleCodec` keyed by it; without one,
    :class:`~cachechain.TaggedJsonCodec`. The value form the backend uses follows from
    the chain built (:func:`_form_of`). ``options`` is not changed; anything malformed
    is passed on untouched for the settings to report."""
    layers = _layer_entries(options)
    if not layers:
        return options, []
    entries: list[Any] = []
    tagged: list[str] = []
    codec: SignedPickleCodec | TaggedJsonCodec | None = None
    for index, entry in enumerate(layers):
        if _wants_default_codec(entry):
            if secret:
                codec = codec or SignedPickleCodec(secret)
            else:
                codec = codec or TaggedJsonCodec()
                tagged.append(str(entry.get("name", f"L{index + 1}")))
            entry = {**entry, "codec": codec}
        entries.append(entry)
    return {**options, "layers": entries}, tagged


def _form_of(chain: Chain) -> ValueForm:
    """The value form a backend uses over ``chain``:
    :data:`~cachechain.contrib._values.PICKLED` only when every layer that keeps values
    outside this process signs them (:class:`~cachechain.SignedPickleCodec`: nothing it
    reads back is unpickled unless its signature checks out), else
    :data:`~cachechain.contrib._values.TAGGED`. Another codec (``json``,
    ``tagged_json``, the application's own) or a remote layer of the application's could
    hand back bytes that anyone able to write to the server stored, and the pickled
    form would unpickle them: code run in every worker (found by review: a memcached
    layer with ``"codec": "tagged_json"`` and a ``SECRET_KEY``)."""
    for layer in chain.layers:
        inner = unwrapped(layer)
        codec = getattr(inner, "codec", None)
        if codec is None and getattr(inner, "local", False):
            continue  # an in-process layer: this process's own objects
        if not isinstance(codec, SignedPickleCodec):  # a layer with a codec that does not
            return TAGGED  # sign is judged by it, whatever it says of itself (local)
    return PICKLED


#: The chains built by the backends and not yet garbage collected, closed at exit.
_OPEN: weakref.WeakSet[Chain] = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()
_EXITING = threading.Event()
_EXIT_TIMEOUT: Final = 2.0


def _close_at_exit(chain: Chain) -> None:
    """Have ``chain`` closed when the interpreter exits."""
    with _OPEN_LOCK:
        _OPEN.add(chain)


def _exiting() -> bool:
    """Whether the exit hook has run (no chain is built or rebuilt after that)."""
    return _EXITING.is_set()


def _close_open_chains() -> None:
    """The exit hook: close every chain a backend built, each within
    ``_EXIT_TIMEOUT`` seconds. Never raises (exit prints no traceback)."""
    _EXITING.set()
    with _OPEN_LOCK:
        chains = list(_OPEN)
    for chain in chains:
        try:
            chain.close(_EXIT_TIMEOUT)
        except Exception:  # pragma: no cover - Chain.close does not raise
            log.debug("cachechain: could not close chain %r at exit", chain.name, exc_info=True)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    """A lock held by another thread at fork time would never be released in the
    child: give it a fresh one (the chains reset their own connections and writers,
    the log-once its lock)."""
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


atexit.register(_close_open_chains)
_fork.at_fork(after_in_child=_after_fork_in_child)
