"""The namespace generation: how ``clear()`` empties a shared layer for every process.

Every key a chain sends to a shared (not ``local``) layer carries the current
*generation* of the shared layer's namespace: ``"<generation in hex>/<key>"``, added by
:class:`NamespacedLayer`, the innermost wrapper of each shared layer. The generation is
a counter stored in the chain's shared layer itself under
``__cachechain__/<codec tag>/gen`` (:attr:`Namespace.generation_key`; never
namespaced, so every process sharing the layer reads the same one), created with
``add`` of a random 62-bit number. When a poll finds it gone (memcached restarted or
was flushed: nothing written under it is left), a process that knew the generation
stores that same one again, so every process stays in one namespace; a fresh random
one there would split them, for up to a poll interval, between the processes that
adopted it and those still writing under the old one (seen in the model test: a value
read back through the old generation after a newer write through the new one).

The *codec tag* (:func:`codec_tag`) separates processes that cannot read each other's
values (two sites with different ``SECRET_KEY``s on one memcached, a key rotation in a
rolling deploy): each such group has its own generation and journal, which it can
read, instead of failing on the others'.

``clear()`` moves the generation (one ``incr``): from then on no process reads a value
written before, and the old entries expire on their own; other applications' keys in
the same memcached are untouched. A process learns of a move from its
:class:`~cachechain._journal.MemcachedJournal`, which reads the generation on every
poll (:meth:`Namespace.adopt`), so within the coherence bound.

The generation is fetched lazily, on the first call that needs it (one round trip),
and by the journal's first poll. While it is unknown (the shared layer unreachable
since the process started) every call of a :class:`NamespacedLayer` raises
:class:`~cachechain.LayerUnavailableError`: the chain counts it as a layer failure and
serves a miss, never a value of an unknown generation.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from . import _fork
from ._errors import ConfigError, LayerUnavailableError
from .layers._base import (
    CacheLayer,
    Lease,
    SupportsAdd,
    SupportsCounters,
    SupportsLease,
    SupportsTouch,
)
from .layers._proxy import LayerProxy

__all__ = [
    "BOOKKEEPING_TTL",
    "RESERVED_PREFIX",
    "Namespace",
    "NamespacedLayer",
    "batch_under",
    "bookkeeping_ttl",
    "codec_tag",
]

#: Keys of cachechain's own bookkeeping in a shared layer start with this; they are
#: never namespaced (a namespaced key starts with a hex digit).
RESERVED_PREFIX: Final = "__cachechain__/"
#: Seconds (ten years: "never", as Django's ``timeout=None``; the contrib backends'
#: ``NO_EXPIRY_TTL`` is this value) that the bookkeeping keys every process shares
#: live on a layer whose ``default_ttl`` is not ``None``: the namespace generation and
#: the journal's head (see :func:`bookkeeping_ttl`).
BOOKKEEPING_TTL: Final = 10 * 365 * 24 * 3600.0


def bookkeeping_ttl(layer: object) -> float | None:
    """The TTL to store a bookkeeping key with on ``layer``: ``None`` (the layer's
    default) when that default is ``None`` (no expiry, and no ``max_ttl`` applies),
    else :data:`BOOKKEEPING_TTL` (a layer's ``max_ttl`` caps it). With the layer's
    300 s default they expired: the head's expiry made every process drop its
    in-process entries every five minutes, and a process that fetched the generation
    just after it expired made up a new one."""
    return None if getattr(layer, "default_ttl", 0.0) is None else BOOKKEEPING_TTL


_BITS: Final = 62  # a fresh generation: far below the 2**63 where counters wrap
_PROBE: Final = ["cachechain-namespace", 1]


def codec_tag(layer: CacheLayer) -> str:
    """A short tag naming what ``layer``'s codec can read: its ``namespace_tag``
    attribute when it has one, else a digest of its ``codec_id`` and its encoding of a
    fixed probe (the same for every process with the same codec and secret; the id
    tells apart codecs that encode the probe alike, such as JSON and tagged JSON, whose
    values the envelope keeps apart); ``"plain"`` for a layer without a ``codec``."""
    codec = getattr(layer, "codec", None)
    if codec is None:
        return "plain"
    tag = getattr(codec, "namespace_tag", None)
    if isinstance(tag, str) and tag:
        return tag
    try:
        probe = codec.encode(_PROBE)
    except Exception:
        return type(codec).__name__
    codec_id = getattr(codec, "codec_id", 0)
    head = str(codec_id).encode() + b":" if isinstance(codec_id, int) else b""
    return hashlib.sha256(head + bytes(probe)).hexdigest()[:12]


class Namespace:
    """The generation of one shared layer's namespace, as this process knows it.

    ``layer`` is the shared layer itself (not wrapped: the generation is read and moved
    with the layer's own timeouts, outside any breaker); it must support ``add`` and
    counters (:class:`~cachechain.layers.SupportsAdd`,
    :class:`~cachechain.layers.SupportsCounters`), else
    :class:`~cachechain.ConfigError`. Thread-safe.
    """

    __slots__ = (
        "__weakref__",
        "_failed",
        "_fetches",
        "_layer",
        "_lock",
        "epoch",
        "generation",
        "generation_key",
        "prefix",
        "reserved",
    )

    def __init__(self, layer: CacheLayer) -> None:
        if not (isinstance(layer, SupportsAdd) and isinstance(layer, SupportsCounters)):
            raise ConfigError(
                f"layer {layer.name!r} needs add and counters to hold a namespace generation"
            )
        self._layer: Any = layer
        self._lock = threading.Lock()
        #: Where this namespace's bookkeeping lives: ``__cachechain__/<codec tag>/``.
        self.reserved = f"{RESERVED_PREFIX}{codec_tag(layer)}/"
        #: The key of the generation in the shared layer.
        self.generation_key = self.reserved + "gen"
        #: The current generation, or None while unknown.
        self.generation: int | None = None
        #: ``"<generation in hex>/"``, or None while unknown.
        self.prefix: str | None = None
        #: How many times this process moved the generation: a poll that read the
        #: generation before a move must not adopt what it read.
        self.epoch = 0
        #: Fetches of the generation that ended (guarded by _lock), and the last one's
        #: failure (its repr; None once one succeeded): callers that waited for a
        #: fetch that failed take its answer.
        self._fetches = 0
        self._failed: str | None = None
        _fork.track(self)

    @property
    def layer(self) -> CacheLayer:
        """The shared layer that holds the generation (not wrapped)."""
        return self._layer  # type: ignore[no-any-return]

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the generation stays: it is the parent's)."""
        self._lock = threading.Lock()

    def current(self) -> str:
        """The key prefix of the current generation, fetched from the shared layer
        (created there if absent) when this process does not know it yet. Raises
        :class:`~cachechain.LayerUnavailableError` when it cannot be fetched."""
        prefix = self.prefix
        if prefix is not None:
            return prefix
        fetches = self._fetches
        with self._lock:
            if self.prefix is None:
                failed = self._failed
                if self._fetches != fetches and failed is not None:
                    # A fetch failed while this caller waited: its answer, not a second
                    # timeout (found by review: 2x the timeout per call).
                    raise self._unknown(failed)
                self._failed = None
                try:
                    generation = self._fetch()
                except Exception as exc:
                    self._failed = repr(exc)  # not exc: its frames hold the caller's
                    self._fetches += 1
                    raise self._unknown(self._failed) from exc
                self._fetches += 1
                self._set(generation)
            return self.prefix  # type: ignore[return-value]  # set just above

    def _unknown(self, why: str) -> LayerUnavailableError:
        return LayerUnavailableError(
            f"the namespace generation of layer {self._layer.name!r} is unknown (the "
            f"layer could not be read: {why})",
            layer=self._layer.name,
        )

    def adopt(self, value: object, epoch: int | None = None) -> bool:
        """Take ``value``, the generation key's content as a poll read it (``None``:
        absent), as the current generation; an absent or unreadable one is replaced
        by a fresh generation. ``epoch``: :attr:`epoch` when the poll read it; a value
        read before this process moved the generation is ignored (it would undo the
        move). Return True when the generation changed from one this process knew
        (its local copies are then stale: the caller drops them). Raises what the
        layer raises when a fresh generation must be stored."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return False
            if not _is_generation(value):
                value = self._create(self.generation)
            known = self.generation
            self._set(value)  # type: ignore[arg-type]  # checked by _is_generation
            return known is not None and known != value

    def move(self) -> bool:
        """Move to a new generation in the shared layer (``incr``, or a fresh one when
        the key is gone) and adopt it: every process stops reading what was written
        before. Return True when it moved; raise what the layer raises.

        A fresh generation is stored with ``set``, not ``add``: what another process
        stored since the key went missing is the generation it knew, put back by its
        poll (:meth:`adopt`), and adopting that would move nothing."""
        with self._lock:
            moved = self._layer.incr(self.generation_key, 1)
            if not _is_generation(moved):
                moved = secrets.randbits(_BITS) + 1
                self._layer.set(self.generation_key, moved, bookkeeping_ttl(self._layer))
            self.epoch += 1
            self._set(moved)
            return True

    def _fetch(self) -> int:
        value = self._layer.get(self.generation_key)
        return value if _is_generation(value) else self._create()

    def _create(self, known: int | None = None) -> int:
        """Store ``known`` (the generation this process had: memcached lost it) or else
        a fresh random one, unless another process just stored one; return the one the
        layer holds then."""
        fresh = known if known is not None else secrets.randbits(_BITS) + 1
        key = self.generation_key
        if self._layer.add(key, fresh, bookkeeping_ttl(self._layer)):
            return fresh
        value = self._layer.get(key)
        if _is_generation(value):
            return int(value)
        self._layer.set(key, fresh, bookkeeping_ttl(self._layer))  # unreadable: replace it
        return fresh

    def _set(self, generation: int) -> None:
        self.generation = generation
        self.prefix = f"{generation:x}/"


def batch_under(layer: CacheLayer) -> Callable[[str, Sequence[str]], Any] | None:
    """``layer.get_many_under(prefix, keys)`` (a batch read that adds ``prefix`` to each
    key as it maps it, by key: :meth:`MemcachedLayer.get_many_under
    <cachechain.MemcachedLayer.get_many_under>`) when the layer's
    ``get_many_with_ttl`` is the one built on it (a subclass that overrides
    ``get_many_with_ttl`` alone, or a patch of it on the class or the instance, is
    read through it); else None. Resolved when a wrapper is built: a patch made
    later is not seen."""
    mro = type(layer).__mro__
    owner = next((c for c in mro if "get_many_under" in vars(c)), None)
    if owner is None or owner is not next(c for c in mro if "get_many_with_ttl" in vars(c)):
        return None
    method = vars(owner)["get_many_with_ttl"]
    if getattr(method, "__qualname__", "") != f"{owner.__qualname__}.get_many_with_ttl":
        return None  # replaced on the class (a mock, a tracing hook): read through it
    if "get_many_with_ttl" in getattr(layer, "__dict__", ()):
        return None  # replaced on the instance
    bound: Any = layer  # it has get_many_under (found above)
    under: Callable[[str, Sequence[str]], Any] = bound.get_many_under
    return under


def _is_generation(value: object) -> bool:
    return type(value) is int and value > 0


class NamespacedLayer(LayerProxy):
    """``layer`` with every key prefixed by ``namespace``'s current generation.

    Implements the :class:`~cachechain.layers.CacheLayer` protocol and forwards the
    atomic operations (``add``, ``incr``, ``decr``, ``touch``, ``lease``: raising
    :class:`~cachechain.ConfigError` when the wrapped layer has none); keys come back
    from batch calls without the prefix. Every call raises
    :class:`~cachechain.LayerUnavailableError` while the generation is unknown and
    cannot be fetched, and otherwise what the wrapped layer raises.
    """

    __slots__ = ("_ns", "_ops", "_under")

    def __init__(self, layer: CacheLayer, namespace: Namespace) -> None:
        super().__init__(layer)
        self._ns = namespace
        self._ops: dict[str, Any] = {}
        self._under = batch_under(layer)

    @property
    def namespace(self) -> Namespace:
        """The namespace whose generation prefixes the keys."""
        return self._ns

    def get(self, key: str) -> Any:
        """The wrapped layer's value of ``key`` in the current generation."""
        return self._layer.get(self._ns.current() + key)

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """``(value, remaining TTL in seconds or None)`` of ``key``, or ``(MISSING, None)``."""
        return self._layer.get_with_ttl(self._ns.current() + key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The hits among ``keys``, by key (without the prefix)."""
        p = self._ns.current()
        n = len(p)
        return {k[n:]: v for k, v in self._layer.get_many([p + k for k in keys]).items()}

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """The hits among ``keys`` with their remaining TTLs (seconds), by key. A layer
        that maps a prefix itself (``get_many_under``: :class:`~cachechain.MemcachedLayer`)
        is given the generation's, so the batch is not copied twice."""
        p = self._ns.current()
        under = self._under
        if under is not None:
            found: dict[str, tuple[Any, float | None]] = under(p, keys)
            return found
        n = len(p)
        found = self._layer.get_many_with_ttl([p + k for k in keys])
        return {k[n:]: v for k, v in found.items()}

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds in the current generation."""
        self._layer.set(self._ns.current() + key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item; return the keys (without the prefix) the layer rejected."""
        p = self._ns.current()
        n = len(p)
        rejected = self._layer.set_many({p + k: v for k, v in items.items()}, ttl)
        return [k[n:] for k in rejected]

    def delete(self, key: str) -> None:
        """Remove ``key`` from the current generation."""
        self._layer.delete(self._ns.current() + key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys`` from the current generation."""
        p = self._ns.current()
        self._layer.delete_many([p + k for k in keys])

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """The wrapped layer's ``add`` of ``key`` in the current generation."""
        ns, method = self._ns, self._ops.get("add") or self._atomic("add")
        stored: bool = method((ns.prefix or ns.current()) + key, value, ttl)
        return stored

    def incr(self, key: str, delta: int = 1) -> int | None:
        """The wrapped layer's ``incr`` of ``key`` in the current generation."""
        ns, method = self._ns, self._ops.get("incr") or self._atomic("incr")
        count: int | None = method((ns.prefix or ns.current()) + key, delta)
        return count

    def decr(self, key: str, delta: int = 1) -> int | None:
        """The wrapped layer's ``decr`` of ``key`` in the current generation."""
        ns, method = self._ns, self._ops.get("decr") or self._atomic("decr")
        count: int | None = method((ns.prefix or ns.current()) + key, delta)
        return count

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """The wrapped layer's ``touch`` of ``key`` in the current generation."""
        ns, method = self._ns, self._ops.get("touch") or self._atomic("touch")
        found: bool = method((ns.prefix or ns.current()) + key, ttl)
        return found

    def lease(self, key: str, ttl: float) -> Lease | None:
        """The wrapped layer's ``lease`` (:class:`~cachechain.layers.SupportsLease`) of
        ``key`` in the current generation: the stub is the namespaced key the value
        will be stored under."""
        ns, method = self._ns, self._ops.get("lease") or self._atomic("lease")
        found: Lease | None = method((ns.prefix or ns.current()) + key, ttl)
        return found

    def _atomic(self, operation: str) -> Any:
        """The wrapped layer's bound ``operation``, checked once (a protocol
        ``isinstance`` costs microseconds). Raises ConfigError when it has none."""
        found = self._ops.get(operation)
        if found is None:
            capability = _CAPABILITIES[operation]
            found = _capable(self._layer, capability, operation).__getattribute__(operation)
            self._ops[operation] = found
        return found


_CAPABILITIES: dict[str, type] = {
    "add": SupportsAdd,
    "incr": SupportsCounters,
    "decr": SupportsCounters,
    "touch": SupportsTouch,
    "lease": SupportsLease,
}


def _capable(layer: CacheLayer, capability: type, operation: str) -> Any:
    if not isinstance(layer, capability):
        raise ConfigError(
            f"layer {layer.name!r} does not support {operation} "
            f"(cachechain.layers.{capability.__name__})"
        )
    return layer
