"""A chain's loader machinery beyond the single flight: its policies (fail-safe, loader
timeouts, eager refresh), the fail-safe throttle, the bounded background loads, and
what they report (counted in the collector, logged once per kind at WARNING).

:class:`Loads` holds them; :mod:`cachechain._chain_load` drives them. A
:class:`LoadJob` is one run of a loader that stores its value (through the fence) and
remembers whether it did; :meth:`Loads.start` runs one on a background thread for a
single-flight call, and records how it ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from ._background import BackgroundLoads
from ._config import LeaseConfig, LoadConfig
from ._errors import ChainClosedError, ConfigError, InvalidValueError, Uncacheable
from ._failsafe import FirstRead, Throttle, first_reader
from ._load_policy import DEFAULT, Default, LoadPolicy, Policies
from ._logonce import LogOnce
from ._singleflight import LoadTimeoutError, _Call
from ._validate import check_callable

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["LoadJob", "Loads", "closed_stamped_read"]

log = logging.getLogger("cachechain")

#: ``record_background_load`` outcomes: the value was stored; loaded but not stored (a
#: mutation of the key meanwhile); the loader raised; not started (no room); still
#: running when the chain closed (nothing stored).
STORED, DISCARDED, FAILED, REJECTED, ABANDONED = (
    "stored",
    "discarded",
    "failed",
    "rejected",
    "abandoned",
)

_LEASE_OFF: Final = LeaseConfig(enabled=False)

_REASONS: Final = {
    "loader_error": "the loader raised",
    "soft_timeout": "the loader passed its soft timeout",
    "hard_timeout": "the wait for the loader passed its hard timeout",
    "throttled": "the loader failed recently (fail_safe_throttle)",
    "lease_wait": "another process's load did not arrive in time",
}


def closed_stamped_read(key: str) -> tuple[Any, float | None, float | None]:
    """A closed chain's stamped read: raises :class:`ChainClosedError`."""
    raise ChainClosedError("the chain is closed")


class LoadJob:
    """``run()`` loads ``key`` with ``loader`` through ``load`` (the chain's
    ``load_and_store``) and returns the value; :attr:`stored` then says whether it was
    stored. With fail-safe on, or for an eager refresh (``recheck=False``: nobody
    waits for it), a loader that raises holds the key's throttle."""

    __slots__ = ("chain", "key", "load", "loader", "policy", "recheck", "stored", "ttl")

    def __init__(
        self,
        load: Callable[..., tuple[Any, bool]],
        chain: Chain,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None,
        policy: LoadPolicy,
        *,
        recheck: bool = True,
    ) -> None:
        self.load = load
        self.chain = chain
        self.key = key
        self.loader = loader
        self.ttl = ttl
        self.policy = policy
        self.recheck = recheck
        self.stored = False

    def run(self) -> Any:
        """Load and store; return the value or raise what the loader raised."""
        throttle = self.chain._loads.throttle
        try:
            value, self.stored = self.load(
                self.chain, self.key, self.loader, self.ttl, self.policy, recheck=self.recheck
            )
        except Exception as exc:
            if (self.policy.fail_safe or not self.recheck) and not isinstance(exc, Uncacheable):
                throttle.hold(self.key, self.policy.throttle)
            raise
        throttle.release(self.key)
        return value


class Loads:
    """A chain's loader machinery: :attr:`policies` (from ``config``, a
    :class:`~cachechain.LoadConfig`, None: the defaults), :attr:`throttle`,
    :attr:`background` (``config.max_background_loads`` at once, threads named after
    the chain ``name``), on ``clock`` (monotonic seconds). ``m`` is the chain's
    collector guard (None: no metrics). Raises :class:`~cachechain.ConfigError` for a
    ``config`` of another type or a ``clock`` that is not callable."""

    __slots__ = (
        "_lease_on",
        "_log",
        "abandoned",
        "background",
        "clock",
        "lease",
        "m",
        "policies",
        "read",
        "throttle",
    )

    def __init__(
        self,
        name: str,
        config: LoadConfig | None,
        m: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config is None:
            config = LoadConfig()
        elif not isinstance(config, LoadConfig):
            raise ConfigError(f"load must be a LoadConfig or None, got {config!r}")
        check_callable(clock, "clock")
        self.policies = Policies(config)
        #: The lease a ``get_or_load`` takes unless it says otherwise.
        self.lease: LeaseConfig = LeaseConfig.of(config.lease)
        self._lease_on = replace(self.lease, enabled=True)  # a call's ``lease=True``
        self.clock = clock
        self.throttle = Throttle(clock)
        self.background = BackgroundLoads(name, config.max_background_loads)
        self.m = m
        self._log = LogOnce(log)
        #: The stamped read of the chain's first layer (see :meth:`bind`), or None.
        self.read: FirstRead | None = None
        #: Set once ``close`` stopped waiting for the background loads: what they load
        #: from then on is not stored.
        self.abandoned = False

    def bind(self, chain: Chain) -> FirstRead:
        """Make :attr:`read`, the stamped read of ``chain``'s first layer, and return it
        (called on first use: the chain's tiers must exist)."""
        self.read = first_reader(chain)
        return self.read

    def lease_for(self, flag: bool | Default) -> LeaseConfig:
        """The lease of a call that passes ``lease=flag``: :data:`DEFAULT` the chain's,
        True the chain's turned on (its ``ttl`` and ``wait`` kept), False none. Raises
        :class:`~cachechain.InvalidValueError` for anything else."""
        if flag is DEFAULT:
            return self.lease
        if flag is True:
            return self._lease_on
        if flag is False:
            return _LEASE_OFF
        raise InvalidValueError(f"lease must be a bool, got {flag!r}")

    def served(self, reason: str, key: str, error: BaseException | None = None) -> None:
        """A fail-safe value of ``key`` was served instead of a load, for ``reason``
        (one of :data:`~cachechain.metrics.FAIL_SAFE_REASONS`): count it, log it."""
        if self.m is not None:
            self.m.record_fail_safe(reason)
        cause = _REASONS.get(reason, reason) + (f": {error!r}" if error is not None else "")
        if reason == "throttled":  # the failure that started the throttle was logged
            log.debug("get_or_load of %r served a fail-safe value (%s)", key, cause)
            return
        self._log(
            ("fail_safe", reason),
            "get_or_load of %r served a fail-safe value (%s). Further fail-safe values "
            "served for this reason are counted, logged at DEBUG",
            key,
            cause,
            debug="get_or_load of %r served a fail-safe value (%s)",
        )

    def start(self, chain: Chain, call: _Call[Any], job: LoadJob) -> bool:
        """Run ``job`` as the single-flight ``call`` of its key on a background thread.
        Without room for it (or after close) the call fails with a
        :class:`~cachechain.LoadTimeoutError` instead; return whether it started."""
        flight = chain._flight
        key = job.key

        def run() -> None:
            try:
                flight.execute(key, call, job.run)
            except Exception as exc:
                self._ended(ABANDONED if self.abandoned else FAILED, key, exc)
            else:
                gone = self.abandoned
                self._ended(ABANDONED if gone else STORED if job.stored else DISCARDED, key)

        if self.background.start(run):
            return True
        error: Exception = LoadTimeoutError(
            f"no room to load {key!r}: {self.background.limit} loads of this chain run in "
            "the background already (LoadConfig.max_background_loads)"
        )
        if chain._closed:
            error = ChainClosedError("the chain is closed")
        self._ended(REJECTED, key, error)
        flight.fail(key, call, error)
        return False

    def _ended(self, outcome: str, key: str, error: BaseException | None = None) -> None:
        if self.m is not None:
            self.m.record_background_load(outcome)
        if error is None:
            return
        self._log(
            ("background", outcome),
            "a background load of %r ended %s (%r). Further such loads are counted, "
            "logged at DEBUG",
            key,
            outcome,
            error,
            debug="a background load of %r ended %s (%r)",
        )

    def close(self, timeout: float) -> int:
        """Start no more background loads (and make :attr:`read` raise
        :class:`~cachechain.ChainClosedError`); wait ``timeout`` seconds at most for
        those running (their values are stored as they arrive); return how many are
        still running: those are abandoned (nothing they load is stored)."""
        self.read = closed_stamped_read
        left = self.background.close(timeout)
        self.abandoned = True
        return left
