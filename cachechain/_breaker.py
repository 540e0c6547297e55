"""A thread-safe circuit breaker that never holds its lock while the guarded call runs.

States (:class:`CircuitState`): ``CLOSED`` lets every call through; ``OPEN`` refuses every call
at once with :class:`~cachechain.CircuitOpenError`; ``HALF_OPEN`` lets a bounded
number of trial calls through to probe the backend.

* CLOSED opens after ``max_failures`` consecutive failures or, when ``failure_rate`` is
  set, once at least ``min_calls`` of the last ``window`` calls were made and that share
  of them failed.
* OPEN becomes HALF_OPEN ``reset_timeout`` seconds after it opened, lazily: the first
  :meth:`CircuitBreaker.acquire`, :attr:`CircuitBreaker.state` or
  :meth:`CircuitBreaker.stats` that finds the time has passed makes the transition and
  tells the listeners. So ``state`` never reports a state the listeners were not told of.
* HALF_OPEN admits at most ``half_open_max_calls`` concurrent trial calls and refuses
  the rest at once. It closes after ``half_open_successes`` successful trials; any trial
  failure reopens it (restarting ``reset_timeout``). A trial still running
  ``reset_timeout`` seconds after it was admitted counts as a failed trial: it reopens
  the breaker at the next refused :meth:`~CircuitBreaker.acquire`, so a call that hangs
  cannot keep the breaker half-open forever.

The protocol: :meth:`~CircuitBreaker.acquire` returns a :class:`Permit` (or raises), and
exactly one of :meth:`~CircuitBreaker.on_success`, :meth:`~CircuitBreaker.on_failure`
or :meth:`~CircuitBreaker.release` (neutral: the call failed for a reason that says
nothing about the backend) must follow, in ``finally``. :meth:`~CircuitBreaker.call`
does all of that. Each state change starts a new generation; a permit from an earlier
generation is ignored when it reports back (sony/gobreaker's generation counter), so a
late result from before a state change cannot disturb the current state.

Cost: in the CLOSED state, ``acquire`` reads one attribute and takes no lock, and so
does ``on_success`` while no failure is recorded (the GIL makes the reads atomic).
State-change listeners run after the lock is released, in the order of the
transitions; one that raises is logged and ignored, and one that calls back into the
breaker does not deadlock. The breaker reads only its injected monotonic clock (seconds).
What a CLOSED breaker counts lives in :mod:`._failure_window`, the delivery to the
listeners in :mod:`._transitions`.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from . import _fork
from ._errors import CircuitOpenError, ConfigError, trips_breaker
from ._failure_window import FailureWindow
from ._transitions import Transitions
from ._validate import check_callable, check_count, check_rate, check_seconds

if TYPE_CHECKING:
    from ._config import BreakerConfig

__all__ = ["BreakerStats", "CircuitBreaker", "CircuitState", "Permit", "StateListener"]

logger = logging.getLogger("cachechain.breaker")

P = ParamSpec("P")
T = TypeVar("T")


class CircuitState(enum.IntEnum):
    """The state of a :class:`CircuitBreaker` (an ``int``, handy as a metrics gauge)."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


#: A state-change listener, called as ``listener(breaker_name, old_state, new_state)``
#: after each transition, outside the breaker's lock.
StateListener = Callable[[str, CircuitState, CircuitState], None]


@dataclass(frozen=True)
class BreakerStats:
    """A point-in-time view of a :class:`CircuitBreaker`.

    ``state`` is the current state; ``consecutive_failures`` the failures recorded since
    the last success (reset when the breaker closes); ``opens`` how many times it has
    opened; ``rejected`` how many calls it refused; ``trial_calls`` how many half-open
    trial calls it admitted. The three counts run from the breaker's creation and are
    not cleared by :meth:`CircuitBreaker.reset`.
    """

    state: CircuitState
    consecutive_failures: int
    opens: int
    rejected: int
    trial_calls: int


class Permit:
    """The right to make one guarded call, returned by :meth:`CircuitBreaker.acquire`.

    Opaque: hand it back to exactly one of ``on_success``, ``on_failure`` or
    ``release``. In the CLOSED state every caller gets the same shared permit (nothing
    is allocated); a half-open trial gets its own, and reporting a trial permit twice
    counts once.
    """

    __slots__ = ("_generation", "_settled", "_started", "_trial")

    def __init__(self, generation: int, *, trial: bool = False, started: float = 0.0) -> None:
        self._generation = generation
        self._trial = trial
        self._started = started
        self._settled = False

    def __repr__(self) -> str:
        kind = "trial" if self._trial else "closed"
        return f"<Permit {kind} generation={self._generation}>"


def _failure_window(
    max_failures: int, failure_rate: object, window: object, min_calls: object
) -> FailureWindow:
    """Check the settings that open a CLOSED breaker; return its window. Raises
    :class:`~cachechain.ConfigError` naming the field."""
    window = check_count(window, "window")
    min_calls = check_count(min_calls, "min_calls")
    rate = check_rate(failure_rate, "failure_rate")
    if rate is not None and min_calls > window:
        raise ConfigError(
            f"min_calls ({min_calls}) must be <= window ({window}) when failure_rate "
            "is set, or the rate could never open the breaker"
        )
    return FailureWindow(max_failures, rate, window, min_calls)


def _check_listeners(listeners: Iterable[StateListener]) -> tuple[StateListener, ...]:
    return tuple(check_callable(fn, "listeners") for fn in listeners)


class CircuitBreaker:
    """A circuit breaker named ``name`` (usually the layer's name).

    Durations are seconds. ``max_failures`` consecutive failures open it;
    ``failure_rate`` (in ``(0, 1]``, ``None`` = off) also opens it when at least that
    share of the last ``window`` calls failed, counted once ``min_calls`` calls were
    made. It stays open ``reset_timeout`` seconds, then admits up to
    ``half_open_max_calls`` concurrent trials and closes after ``half_open_successes``
    successful ones. ``clock`` returns monotonic seconds (inject one in tests); it is the
    only clock read. ``listeners`` are called on every state change (see
    :data:`StateListener`).

    Raises :class:`~cachechain.ConfigError` naming the field for an invalid
    setting (including ``min_calls > window`` when ``failure_rate`` is set, which could
    never trip).
    """

    def __init__(
        self,
        name: str,
        *,
        max_failures: int = 5,
        reset_timeout: float = 10.0,
        half_open_max_calls: int = 1,
        half_open_successes: int = 1,
        failure_rate: float | None = None,
        window: int = 20,
        min_calls: int = 10,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[StateListener] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        self._max_failures = max_failures = check_count(max_failures, "max_failures")
        self._reset_timeout = check_seconds(reset_timeout, "reset_timeout")
        self._half_open_max_calls = check_count(half_open_max_calls, "half_open_max_calls")
        self._half_open_successes = check_count(half_open_successes, "half_open_successes")
        #: Consecutive failures and the failure-rate window (guarded by _lock).
        self._counts = _failure_window(max_failures, failure_rate, window, min_calls)
        self._clock = check_callable(clock, "clock")
        #: The listeners, and the transitions waiting for them, in order.
        self._transitions = Transitions(name, _check_listeners(listeners))
        self._name = name
        self._lock = threading.Lock()

        # Guarded by _lock; the attributes read without the lock (_fast, _clean, _ok)
        # are only ever replaced whole, so a lock-free reader sees an old or a new value.
        self._state = CircuitState.CLOSED
        self._generation = 0
        closed = Permit(0)
        #: The shared permit while CLOSED, else None: ``acquire``'s lock-free path.
        self._fast: Permit | None = closed
        #: The shared permit while CLOSED with no failure recorded, else None:
        #: ``on_success``'s lock-free path.
        self._clean: Permit | None = closed
        #: Failure-rate mode while clean: counts successes without the lock (a C-level
        #: ``next`` is atomic under the GIL). ``None`` otherwise.
        self._ok: itertools.count[int] | None = (
            itertools.count() if self._counts.rate is not None else None
        )
        self._opened_at = 0.0
        self._trials: list[Permit] = []  # trial permits in flight, oldest first
        self._trial_successes = 0
        self._opens = 0
        self._rejected = 0
        self._trial_calls = 0
        _fork.track(self)

    @classmethod
    def from_config(
        cls, name: str, config: BreakerConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> CircuitBreaker:
        """A breaker named ``name`` with the settings of ``config`` (a
        :class:`~cachechain.BreakerConfig`). Raises :class:`~cachechain.ConfigError`
        for a bad name."""
        return cls(
            name,
            max_failures=config.max_failures,
            reset_timeout=config.reset_timeout,
            half_open_max_calls=config.half_open_max_calls,
            half_open_successes=config.half_open_successes,
            failure_rate=config.failure_rate,
            window=config.window,
            min_calls=config.min_calls,
            clock=clock,
        )

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock; trial calls of the parent's threads will
        never report back, so their slots are freed."""
        self._lock = threading.Lock()
        self._trials = []

    # -- public API -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The breaker's name, passed to listeners and put on ``CircuitOpenError``."""
        return self._name

    @property
    def reset_timeout(self) -> float:
        """How long (seconds) the breaker stays open before it admits trial calls."""
        return self._reset_timeout

    @property
    def max_failures(self) -> int:
        """Consecutive failures that open the breaker (its ``max_failures`` setting)."""
        return self._max_failures

    @property
    def state(self) -> CircuitState:
        """The current state.

        If the breaker is OPEN and ``reset_timeout`` has passed, this makes the
        transition to HALF_OPEN (and tells the listeners) before answering, so the answer
        is always a state the listeners know of.
        """
        if self._state is not CircuitState.OPEN:
            return self._state
        with self._lock:
            self._refresh_locked()
            state = self._state
        self._transitions.deliver()
        return state

    def refusing(self) -> bool:
        """True while the breaker is OPEN and its ``reset_timeout`` has not passed: a
        call now would be refused. Lock-free and without side effects (it makes no
        transition), for callers that want to skip work bound to be refused."""
        return (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at < self._reset_timeout
        )

    def failing(self) -> bool:
        """True while the last outcome reported was a failure (no success since), or
        the breaker is not CLOSED: a caller about to make a second call in one
        operation can skip it rather than wait out another timeout. Lock-free, without
        side effects."""
        return self._state is not CircuitState.CLOSED or self._counts.consecutive > 0

    def acquire(self) -> Permit:
        """Ask to make one guarded call; return its :class:`Permit`.

        Exactly one of :meth:`on_success`, :meth:`on_failure` or :meth:`release` must
        follow with the permit, whatever happens (use ``try``/``finally``). Takes no lock
        in the CLOSED state. Raises :class:`~cachechain.CircuitOpenError` (with
        ``layer`` set to the breaker's name) without waiting when the breaker is open,
        or half-open with every trial slot taken; the refusal is counted in ``rejected``.
        """
        permit = self._fast
        if permit is not None:
            return permit
        return self._acquire_slow()

    def on_success(self, permit: Permit) -> None:
        """Report that the call made with ``permit`` succeeded.

        Resets the consecutive-failure count; a successful trial may close the breaker.
        Takes no lock in the CLOSED state while no failure is recorded. A permit from an
        earlier generation is ignored.
        """
        if permit is self._clean:
            ok = self._ok
            if ok is not None:
                next(ok)
            return
        with self._lock:
            if permit._generation == self._generation:
                if self._state is CircuitState.CLOSED:
                    self._counts.success()
                    self._maybe_clean_locked()
                elif self._settle_trial_locked(permit):
                    self._counts.consecutive = 0
                    self._trial_successes += 1
                    if self._trial_successes >= self._half_open_successes:
                        self._transition_locked(CircuitState.CLOSED)
        self._transitions.deliver()

    def on_failure(self, permit: Permit) -> None:
        """Report that the call made with ``permit`` failed in a way that speaks about
        the backend's health (an error, a timeout, a slow call).

        May open the breaker; a failed trial reopens it. A permit from an earlier
        generation is ignored.
        """
        with self._lock:
            if permit._generation == self._generation:
                if self._state is CircuitState.CLOSED:
                    if self._clean is not None:
                        self._make_dirty_locked()
                    if self._counts.failure():
                        self._transition_locked(CircuitState.OPEN)
                elif self._settle_trial_locked(permit):
                    self._counts.consecutive += 1
                    self._transition_locked(CircuitState.OPEN)
        self._transitions.deliver()

    def release(self, permit: Permit) -> None:
        """Hand ``permit`` back without reporting an outcome.

        For a call that ended with an error that is not the backend's fault (invalid
        input, an interrupt): nothing is counted, and a trial slot is freed for another
        trial. Takes no lock for a CLOSED-state permit.
        """
        if not permit._trial:
            return
        with self._lock:
            if permit._generation == self._generation:
                self._settle_trial_locked(permit)

    def on_error(self, permit: Permit, exc: BaseException) -> None:
        """Report that the call made with ``permit`` raised ``exc``, classified.

        An :class:`Exception` for which :func:`~cachechain._errors.trips_breaker` is true
        is a failure (:meth:`on_failure`); any other exception is neutral
        (:meth:`release`). A ``BaseException`` that is not an ``Exception``
        (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``) is neutral: it says
        nothing about the backend, and counting it would open breakers on shutdown.
        """
        if isinstance(exc, Exception) and trips_breaker(exc):
            self.on_failure(permit)
        else:
            self.release(permit)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under the breaker and return its result.

        The permit is always handed back, in ``finally``: success on return, otherwise as
        :meth:`on_error` classifies the exception, which is then re-raised unchanged.
        Raises :class:`~cachechain.CircuitOpenError` without calling ``fn`` when
        the breaker refuses the call.
        """
        permit = self.acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.on_error(permit, exc)
            raise
        self.on_success(permit)
        return result

    def reset(self) -> None:
        """Force the breaker CLOSED with no failure recorded (an operator action).

        Listeners are told if the state changes. Results of calls admitted before the
        reset are ignored. The ``opens``/``rejected``/``trial_calls`` counts are kept.
        """
        with self._lock:
            self._transition_locked(CircuitState.CLOSED)
        self._transitions.deliver()

    def stats(self) -> BreakerStats:
        """Return a consistent snapshot of the state and the counts (see
        :class:`BreakerStats`). Makes a due OPEN to HALF_OPEN transition first, as
        :attr:`state` does."""
        with self._lock:
            self._refresh_locked()
            stats = BreakerStats(
                state=self._state,
                consecutive_failures=self._counts.consecutive,
                opens=self._opens,
                rejected=self._rejected,
                trial_calls=self._trial_calls,
            )
        self._transitions.deliver()
        return stats

    @property
    def rejected(self) -> int:
        """How many calls the breaker has refused since it was created."""
        return self._rejected

    def add_listener(self, fn: StateListener) -> None:
        """Call ``fn(name, old, new)`` on every later state change. Raises
        :class:`~cachechain.ConfigError` if ``fn`` is not callable."""
        self._transitions.add(fn)

    def remove_listener(self, fn: StateListener) -> None:
        """Stop calling ``fn`` (its first registration, compared with ``==``); does
        nothing if it is not registered."""
        self._transitions.remove(fn)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._name!r} {self._state.name}>"

    # -- internals (the *_locked methods run with _lock held) --------------------------

    def _acquire_slow(self) -> Permit:
        with self._lock:
            permit = self._admit_locked()
        try:
            self._transitions.deliver()
        except BaseException:
            if permit is not None:
                self.release(permit)
            raise
        if permit is None:
            raise CircuitOpenError(f"circuit breaker {self._name!r} is open", layer=self._name)
        return permit

    def _admit_locked(self) -> Permit | None:
        """Return a permit, or None after counting a refusal."""
        state = self._state
        if state is CircuitState.CLOSED:  # closed by another thread since the lock-free read
            return self._fast
        now = self._clock()
        if state is CircuitState.OPEN:
            if not self._open_elapsed_locked(now):
                self._rejected += 1
                return None
            self._transition_locked(CircuitState.HALF_OPEN)
        trials = self._trials
        if len(trials) < self._half_open_max_calls:
            permit = Permit(self._generation, trial=True, started=now)
            trials.append(permit)
            self._trial_calls += 1
            return permit
        if now - trials[0]._started >= self._reset_timeout:
            # The oldest trial has run for a whole reset_timeout: a failed trial.
            self._counts.consecutive += 1
            self._transition_locked(CircuitState.OPEN, now)
        self._rejected += 1
        return None

    def _refresh_locked(self) -> None:
        if self._state is CircuitState.OPEN and self._open_elapsed_locked(self._clock()):
            self._transition_locked(CircuitState.HALF_OPEN)

    def _open_elapsed_locked(self, now: float) -> bool:
        if now < self._opened_at:  # an injected clock went backwards: re-anchor
            self._opened_at = now
        return now - self._opened_at >= self._reset_timeout

    def _settle_trial_locked(self, permit: Permit) -> bool:
        """Free a current-generation trial permit's slot; False if already settled."""
        if not permit._trial or permit._settled:
            return False
        permit._settled = True
        self._trials.remove(permit)
        return True

    def _make_dirty_locked(self) -> None:
        """Leave the lock-free 'no failure recorded' mode before recording a failure."""
        self._clean = None
        ok = self._ok
        self._ok = None
        if ok is not None:
            # Successes counted lock-free; a success racing this first failure may be
            # missed, which shifts the failure-rate window by at most one call.
            self._counts.resume(next(ok))

    def _maybe_clean_locked(self) -> None:
        """Return to the lock-free mode once no failure is recorded any more."""
        counts = self._counts
        if not counts.clean:
            return
        if counts.rate is not None:
            self._ok = itertools.count(counts.suspend())
        self._clean = self._fast

    def _transition_locked(self, new: CircuitState, now: float | None = None) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._trials = []
        self._trial_successes = 0
        if new is CircuitState.CLOSED:
            permit = Permit(self._generation)
            self._counts.clear()
            if self._counts.rate is not None:
                self._ok = itertools.count()
            self._clean = permit
            self._fast = permit
        else:
            self._fast = None
            self._clean = None
            self._ok = None
            if new is CircuitState.OPEN:
                self._opened_at = self._clock() if now is None else now
                self._opens += 1
        if old is not new:
            self._transitions.push(old, new)
