"""MetricsCollectorTests: the contract of :class:`cachechain.metrics.MetricsCollector`,
as pytest tests.

The ``record_*`` methods are found on :class:`~cachechain.metrics.MetricsCollector`
itself and called with arguments made from their parameters, so a method added to the
contract is tested without a change here. Subclass the suite in a test module, name
the subclass ``Test...`` and give it a ``collector`` fixture (see the class docstring).
"""

from __future__ import annotations

import inspect
import itertools
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pytest

from .._chain import Chain
from .._config import BreakerConfig, LayerConfig
from .._errors import ERROR_TYPES, LayerUnavailableError
from .._writer import DROP_REASONS
from ..layers._memory import MemoryLayer
from ..metrics._base import MetricsCollector
from ._fakes import FakeLayer
from ._threads import run_together

__all__ = ["MetricsCollectorTests", "record_arguments", "record_methods"]

#: Operations the chain names in ``record_error``.
OPERATIONS = ("get", "get_many", "set", "set_many", "delete", "delete_many", "close")
_DURATIONS = (0.0, 0.0004, 2.5)

#: Sample arguments by parameter name (``layer`` and ``layer_index`` come from the
#: layer names the suite binds).
ARGUMENT_SAMPLES: dict[str, tuple[Any, ...]] = {
    "hit": (True, False),
    "success": (True, False),
    "duration": _DURATIONS,
    "total_duration": _DURATIONS,
    "state": (0, 1, 2),
    "depth": (0, 1, 10_000),
    "capacity": (1, 10_000),
    "count": (1, 250),
    "entries": (0, 1, 10_000),
    "reason": DROP_REASONS,
    "operation": OPERATIONS,
    "error_type": ERROR_TYPES,
}
_BY_TYPE: dict[Any, tuple[Any, ...]] = {bool: (True, False), float: (0.0, 0.001), int: (0, 1)}

_THREADS = 8
_ROUNDS = 200


def record_methods() -> tuple[str, ...]:
    """The names of every ``record_*`` method of :class:`MetricsCollector`, sorted."""
    return tuple(
        sorted(
            name
            for name, member in inspect.getmembers(MetricsCollector, callable)
            if name.startswith("record_")
        )
    )


def record_arguments(
    name: str, layers: Sequence[str], samples: dict[str, tuple[Any, ...]] | None = None
) -> list[tuple[Any, ...]]:
    """Every combination of sample arguments for ``MetricsCollector.<name>``: ``layers``
    for a ``layer`` parameter, ``-1`` and each layer's position for ``layer_index``,
    ``samples`` (default :data:`ARGUMENT_SAMPLES`) by parameter name, else by annotated
    type (``bool``, ``float``, ``int``; ``str``: ``layers``).

    Raises ``TypeError`` for a parameter it can make no argument for."""
    samples = ARGUMENT_SAMPLES if samples is None else samples
    method = getattr(MetricsCollector, name)
    try:
        hints = typing.get_type_hints(method)
    except Exception:  # annotations it cannot evaluate: go by names alone
        hints = {}
    choices: list[tuple[Any, ...]] = []
    for param in list(inspect.signature(method).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.KEYWORD_ONLY):
            continue
        if param.name == "layer":
            choices.append(tuple(layers))
        elif param.name == "layer_index":
            choices.append((-1, *range(len(layers))))
        elif param.name in samples:
            choices.append(samples[param.name])
        elif hints.get(param.name) is str:
            choices.append(tuple(layers))
        elif hints.get(param.name) in _BY_TYPE:
            choices.append(_BY_TYPE[hints[param.name]])
        else:
            raise TypeError(
                f"no sample arguments for parameter {param.name!r} of {name}(): add them to "
                "the suite's argument_samples"
            )
    return list(itertools.product(*choices))


class _Witness:
    """Stands between a chain and the collector under test, and keeps what the
    collector raised (a chain swallows it)."""

    def __init__(self, target: Any, errors: list[tuple[str, tuple[Any, ...], BaseException]]):
        self._target = target
        self.errors = errors

    def bind_chain(self, chain: str, layers: Sequence[str]) -> _Witness:
        bind = getattr(self._target, "bind_chain", None)
        return _Witness(self._target if bind is None else bind(chain, layers), self.errors)

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        add = getattr(self._target, "add_refresh_hook", None)
        if add is not None:
            add(fn)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("record_"):
            raise AttributeError(name)
        method = getattr(self._target, name)

        def call(*args: Any) -> None:
            try:
                method(*args)
            except Exception as exc:
                self.errors.append((name, args, exc))
                raise

        return call


class MetricsCollectorTests:
    """The :class:`~cachechain.metrics.MetricsCollector` contract as pytest tests: every
    ``record_*`` method takes its documented arguments and never raises, bound or not,
    from many threads at once; ``bind_chain``, ``add_refresh_hook`` and ``close`` (if
    the collector has it) behave; a chain reporting to it meets no error.

    Subclass it as ``class TestMyCollector(MetricsCollectorTests)`` and define the
    fixture ``collector(self)``: it returns (or yields, closing it afterwards) a new
    collector. If the collector reads its figures (a snapshot, a scrape, a flush),
    override :meth:`read_figures` to make it read, so that the suite sees its refresh
    hooks run. :attr:`layers` are the layer names the suite binds;
    :attr:`argument_samples` adds or replaces sample arguments by parameter name.
    """

    #: The layer names the suite binds the collector to (at least two).
    layers: ClassVar[tuple[str, ...]] = ("L1", "L2")
    #: Extra sample arguments by parameter name; they replace the suite's own.
    argument_samples: ClassVar[dict[str, tuple[Any, ...]]] = {}

    # -- what a subclass provides ---------------------------------------------------------

    @pytest.fixture()
    def collector(self) -> Any:
        """The collector under test: override this fixture in the subclass."""
        raise pytest.UsageError(
            f"{type(self).__name__} must define a `collector` fixture returning the collector "
            "under test (see cachechain.testing.MetricsCollectorTests)"
        )

    def read_figures(self, collector: Any) -> bool:
        """Make ``collector`` read its figures now (running its refresh hooks) and
        return True; the default can't, and returns False."""
        return False

    # -- helpers ----------------------------------------------------------------------------

    def _calls(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        samples = {**ARGUMENT_SAMPLES, **self.argument_samples}
        for name in record_methods():
            for args in record_arguments(name, self.layers, samples):
                yield name, args

    def _record_everything(self, target: Any) -> None:
        for name, args in self._calls():
            getattr(target, name)(*args)

    # -- record_* -------------------------------------------------------------------------

    def test_it_has_every_record_method(self, collector: Any) -> None:
        for target in (collector, collector.bind_chain("conformance", self.layers)):
            missing = [n for n in record_methods() if not callable(getattr(target, n, None))]
            assert not missing, f"{target!r} lacks {missing}"

    def test_every_record_method_takes_its_documented_arguments(self, collector: Any) -> None:
        self._record_everything(collector.bind_chain("conformance", self.layers))

    def test_records_before_any_binding_do_not_raise(self, collector: Any) -> None:
        self._record_everything(collector)

    def test_a_layer_it_was_not_told_of_does_not_raise(self, collector: Any) -> None:
        bound = collector.bind_chain("conformance", self.layers)
        for name, args in self._calls():
            if args and args[0] in self.layers and "layer" in _parameters(name):
                getattr(bound, name)("unheard-of", *args[1:])

    def test_records_from_many_threads_at_once(self, collector: Any) -> None:
        bound = collector.bind_chain("conformance", self.layers)
        calls = [(getattr(bound, name), args) for name, args in self._calls()]

        def work(n: int) -> None:
            for i in range(_ROUNDS):
                method, args = calls[(n + i * 7) % len(calls)]
                method(*args)

        run_together(work, _THREADS)

    # -- bind_chain -----------------------------------------------------------------------

    def test_bind_chain_serves_several_chains_and_rebinding(self, collector: Any) -> None:
        first = collector.bind_chain("first", self.layers)
        other = collector.bind_chain("second", (self.layers[0], "other"))
        again = collector.bind_chain("first", self.layers)
        for bound, layer in ((first, self.layers[0]), (other, "other"), (again, self.layers[1])):
            bound.record_get(layer, True, 0.001)
            bound.record_chain_get(False, -1, 0.002)

    # -- refresh hooks --------------------------------------------------------------------

    def test_refresh_hooks_run_before_a_read(self, collector: Any) -> None:
        add = getattr(collector, "add_refresh_hook", None)
        if add is None:
            return  # a collector that never reads needs no hooks
        ran: list[str] = []

        def good() -> None:
            ran.append("good")

        def failing() -> None:
            ran.append("failing")
            raise RuntimeError("a refresh hook failed")

        def done() -> bool:
            ran.append("done")
            return False

        add(failing)
        add(done)
        add(good)
        if not self.read_figures(collector):
            return  # it cannot read: accepting hooks is all it must do
        assert ran.count("good") >= 1, "a refresh hook did not run before a read"
        assert "failing" in ran and "done" in ran
        ran.clear()
        assert self.read_figures(collector)
        assert "good" in ran and "failing" in ran, "a failing hook stopped the others"
        assert "done" not in ran, "a hook that returned False was called again"

    # -- close ----------------------------------------------------------------------------

    def test_close_is_idempotent_and_records_go_on(self, collector: Any) -> None:
        close = getattr(collector, "close", None)
        if close is None:
            return  # nothing to close
        bound = collector.bind_chain("conformance", self.layers)
        bound.record_get(self.layers[0], True, 0.001)
        close()
        close()
        self._record_everything(bound)
        self._record_everything(collector)

    # -- through a chain ------------------------------------------------------------------

    def test_a_chain_reporting_to_it_meets_no_error(self, collector: Any) -> None:
        errors: list[tuple[str, tuple[Any, ...], BaseException]] = []
        remote = FakeLayer(self.layers[1])
        chain = Chain(
            [
                MemoryLayer(self.layers[0], maxsize=4),
                LayerConfig(layer=remote, breaker=BreakerConfig(max_failures=1)),
            ],
            name="conformance",
            metrics=_Witness(collector, errors),
        )
        try:
            _exercise(chain, remote)
            self.read_figures(collector)
        finally:
            chain.close(timeout=5.0)
        assert not errors, f"the collector raised: {errors[0]}"


def _parameters(name: str) -> list[str]:
    return list(inspect.signature(getattr(MetricsCollector, name)).parameters)[1:]


def _exercise(chain: Chain, remote: FakeLayer) -> None:
    """Hits, misses, loads (one failing), batches, deletes, evictions, a failing remote
    layer and its open breaker."""
    chain.set("a", 1)
    assert chain.get("a") == 1
    chain.get("absent")
    chain.get_or_load("loaded", lambda: 2)
    with pytest.raises(KeyError):
        chain.get_or_load("failing", _fail_loading)
    chain.get_many(["a", "loaded", "absent"])
    chain.set_many({f"many:{i}": i for i in range(8)})  # more than L1 holds: evictions
    chain.delete("a")
    chain.delete_many(["loaded", "many:0"])
    chain.flush(timeout=5.0)
    remote.fail = LayerUnavailableError("down", layer=remote.name)
    chain.get("remote-down")  # fails: the breaker opens
    chain.get("remote-down-again")  # refused by the open breaker
    chain.set("written-while-down", 3)
    remote.fail = None
    chain.flush(timeout=1.0)


def _fail_loading() -> Any:
    raise KeyError("the loader failed")
