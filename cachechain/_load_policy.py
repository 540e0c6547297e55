"""How one ``get_or_load`` treats its loader: the chain's :class:`~cachechain.LoadConfig`
defaults with the call's own options over them.

:class:`Policies` resolves a call's options (``fail_safe``, ``soft_timeout``,
``hard_timeout``, ``eager_refresh``; :data:`DEFAULT` for "the chain's") into a
:class:`LoadPolicy`, or None when every feature is off (the plain path). Options are
validated at the front door, each error naming its argument; a resolved combination
is remembered (a few hundred at most), so a call that passes options costs a dict
lookup, not a validation.
"""

from __future__ import annotations

import threading
from typing import Final

from . import _fork
from ._config import LoadConfig, check_share
from ._errors import InvalidValueError
from ._validate import check_optional_seconds

__all__ = ["DEFAULT", "Default", "LoadPolicy", "Policies"]


class Default:
    """The type of :data:`DEFAULT`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"


#: An option left to the chain's :class:`~cachechain.LoadConfig`.
DEFAULT: Final = Default()

#: Resolved option combinations a chain remembers; past it the memory starts again.
_REMEMBERED = 256


class LoadPolicy:
    """The resolved options of a ``get_or_load`` (seconds as ``float``; ``None``: off).

    ``stamps``: loads store stamped entries and reads look at them (fail-safe or eager
    refresh is on); ``grace``: the seconds a stored value is kept past its TTL
    (``fail_safe_max_age`` with fail-safe on, else 0); ``refresh_at``: the share of a
    TTL left (``1 - eager_refresh``) below which a hit starts a refresh.
    """

    __slots__ = (
        "fail_safe",
        "grace",
        "hard_timeout",
        "max_age",
        "refresh_at",
        "soft_timeout",
        "stamps",
        "throttle",
    )

    def __init__(
        self,
        *,
        fail_safe: bool,
        max_age: float,
        throttle: float,
        soft_timeout: float | None,
        hard_timeout: float | None,
        eager_refresh: float | None,
    ) -> None:
        self.fail_safe = fail_safe
        self.max_age = max_age
        self.throttle = throttle
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout
        self.refresh_at = None if eager_refresh is None else 1.0 - eager_refresh
        self.stamps = fail_safe or eager_refresh is not None
        self.grace = max_age if fail_safe else 0.0

    def timed(self, has_fallback: bool) -> bool:
        """Whether the load must run apart from the caller (on a background thread), so
        that the caller can stop waiting: a hard timeout, or a soft one with a
        fail-safe value to serve."""
        return self.hard_timeout is not None or (has_fallback and self.soft_timeout is not None)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"LoadPolicy({fields})"


def _policy(
    config: LoadConfig,
    fail_safe: bool,
    soft: float | None,
    hard: float | None,
    eager: float | None,
) -> LoadPolicy | None:
    if not fail_safe and soft is None and hard is None and eager is None:
        return None
    return LoadPolicy(
        fail_safe=fail_safe,
        max_age=float(config.fail_safe_max_age),
        throttle=float(config.fail_safe_throttle),
        soft_timeout=soft,
        hard_timeout=hard,
        eager_refresh=eager,
    )


class Policies:
    """A chain's loader policies: :attr:`default` (from its ``config``; None when every
    feature is off) and :meth:`resolve` for a call's own options. Thread-safe."""

    __slots__ = (
        "__weakref__",
        "_known",
        "_lock",
        "config",
        "default",
        "fail_safe_off",
        "fail_safe_on",
    )

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        soft = check_optional_seconds(config.soft_timeout, "load.soft_timeout", zero_ok=True)
        hard = check_optional_seconds(config.hard_timeout, "load.hard_timeout", zero_ok=True)
        #: The policy of a call that gives no option (None: the plain path).
        self.default = _policy(
            config,
            config.fail_safe,
            soft,
            hard,
            check_share(config.eager_refresh, "load.eager_refresh"),
        )
        self._known: dict[tuple[object, ...], LoadPolicy | None] = {}
        self._lock = threading.Lock()
        _fork.track(self)
        #: The policies of a call that gives ``fail_safe=True`` (or ``False``) alone.
        self.fail_safe_on = self._resolve(True, DEFAULT, DEFAULT, DEFAULT)
        self.fail_safe_off = self._resolve(False, DEFAULT, DEFAULT, DEFAULT)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock."""
        self._lock = threading.Lock()

    def resolve(
        self,
        fail_safe: bool | Default,
        soft_timeout: float | Default | None,
        hard_timeout: float | Default | None,
        eager_refresh: float | Default | None,
    ) -> LoadPolicy | None:
        """The policy of a call with these options (:data:`DEFAULT`: the chain's).
        Raises :class:`~cachechain.InvalidValueError` naming the argument: ``fail_safe``
        not a bool, a timeout that is not a finite number of seconds ``>= 0`` (or None:
        off), ``eager_refresh`` not in ``(0, 1)`` (or None: off)."""
        # Types are part of the key: True == 1 and False == 0.0 must not share a policy.
        options = (
            fail_safe.__class__,
            fail_safe,
            soft_timeout.__class__,
            soft_timeout,
            hard_timeout.__class__,
            hard_timeout,
            eager_refresh.__class__,
            eager_refresh,
        )
        try:
            return self._known[options]
        except KeyError:
            pass
        except TypeError:  # an unhashable option: invalid, the checks below say why
            pass
        policy = self._resolve(fail_safe, soft_timeout, hard_timeout, eager_refresh)
        with self._lock:
            if len(self._known) >= _REMEMBERED:
                self._known.clear()
            self._known[options] = policy
        return policy

    def _resolve(
        self,
        fail_safe: bool | Default,
        soft_timeout: float | Default | None,
        hard_timeout: float | Default | None,
        eager_refresh: float | Default | None,
    ) -> LoadPolicy | None:
        config = self.config
        if fail_safe is DEFAULT:
            fail_safe = config.fail_safe
        elif not isinstance(fail_safe, bool):
            raise InvalidValueError(f"fail_safe must be a bool, got {fail_safe!r}")
        if soft_timeout is DEFAULT:
            soft_timeout = config.soft_timeout
        if hard_timeout is DEFAULT:
            hard_timeout = config.hard_timeout
        if eager_refresh is DEFAULT:
            eager_refresh = config.eager_refresh
        soft = check_optional_seconds(
            soft_timeout, "soft_timeout", zero_ok=True, error=InvalidValueError
        )
        hard = check_optional_seconds(
            hard_timeout, "hard_timeout", zero_ok=True, error=InvalidValueError
        )
        eager = check_share(eager_refresh, "eager_refresh", error=InvalidValueError)
        return _policy(config, fail_safe, soft, hard, eager)
