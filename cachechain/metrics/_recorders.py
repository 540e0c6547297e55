"""The ``record_*`` methods of a chain's view of an accumulating collector, built from the
catalogue.

Each method is a closure over the view's state, with the slots its calls touch resolved
in advance from the catalogue's feeds (:meth:`Layout.slots`): no lookups on the request
path, no lock but for breaker transitions, and nothing that raises for well-typed
arguments. Four forms cover every :class:`~cachechain.metrics.Record`:

- a count and a duration chosen by one bool (``record_get``, ``record_set``, ...), with
  a position when the record has one (``record_chain_get``), compiled for the engine's
  flavour (:mod:`cachechain.metrics._inline`);
- the latest value of a gauge, with the counts of the transitions it makes;
- a fused record (``record_first_layer_hit``): one histogram of its own, added into the
  cells it stands for when read, and the records it stands for otherwise;
- anything else: the slots resolved per distinct argument values, and walked.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._base import never_raises, stand_in
from ._catalogue import GAUGE, RECORDS, Arg, Record, feeds_of, series_params
from ._inline import closure
from ._layout import ADD, INC, OBSERVE, Slot

if TYPE_CHECKING:
    from ._engine import Acc, ChainView

__all__ = ["install", "sampler"]

#: Distinct argument values whose slots a generic record method remembers.
MAX_PLANS = 256

Recorder = Callable[..., None]


def install(view: ChainView, track_max: bool, track_sum: bool) -> None:
    """Set every ``record_*`` method of ``view`` (fused records last: they fall back on
    the others)."""
    kit = _Kit(view, track_max, track_sum)
    for rec in sorted(RECORDS, key=lambda r: bool(r.stands_for)):
        setattr(view, rec.name, never_raises(kit.build(rec)))


def sampler(view: ChainView, name: str) -> Callable[[float, int], None]:
    """The ``timed`` of ``view``'s :class:`~cachechain.metrics.HitSampler` for the fused
    record ``name``: count a duration, in the record's histogram of samples, once for
    each hit the sampler counted since the previous sample (``n + 1`` hits counted up
    to this one, less those the samples before stood for: :attr:`ChainView.sampled`,
    under the engine's lock), so that the histogram never counts more hits than the
    counter did."""
    kit = _Kit(view, view.engine.track_max, view.engine.track_sum)
    sh = view.block.sampled[name]
    nb = view.layout.nb
    observe = kit.compiled("sampled", name, sh=sh, sh_sum=sh + nb, sh_max=sh + nb + 1)

    tl, register = view.tl, view._register

    @never_raises
    def timed(duration: float, n: int) -> None:
        if getattr(tl, "a", None) is None:
            register()  # takes the engine's lock: before it is held below
        # The weight and the observation under one hold of the lock (one hit in every;
        # looked up each time: a forked child has a new one), so that a reset sees the
        # sample wholly before or wholly after it.
        with view.engine._lock:
            weight = n + 1 - view.sampled
            if weight > 0:  # else a later sample got there first
                view.sampled = n + 1
                observe(duration, weight)

    return timed


class _Kit:
    """What the closures of one view share, and one builder per form."""

    def __init__(self, view: ChainView, track_max: bool, track_sum: bool) -> None:
        self.view = view
        self.track_max = track_max
        self.track_sum = track_sum
        self.layout = view.layout
        self.block = view.block

    def build(self, rec: Record) -> Recorder:
        """The closure of ``rec``."""
        if rec.stands_for:
            return self.fused(rec)
        if any(m.kind == GAUGE for m, _ in feeds_of(rec.name)):
            return self.gauge(rec)
        return self.timed(rec) or self.generic(rec)

    # -- shared pieces ---------------------------------------------------------------------
    def acc(self) -> Callable[[], Acc]:
        """A function returning the calling thread's list (registering it first)."""
        tl, register = self.view.tl, self.view._register

        def acc() -> Acc:
            try:
                return tl.a  # type: ignore[no-any-return]
            except AttributeError:
                return register()

        return acc

    def slot(self) -> Callable[[str], int | None]:
        """A function returning where a layer's block starts (adding the layer if new;
        ``None`` past the limit of layers)."""
        offsets, add_layer = self.view.offsets, self.view.add_layer

        def slot(layer: str) -> int | None:
            base = offsets.get(layer)
            return add_layer(layer) if base is None else base

        return slot

    def observe(self) -> Callable[[Acc, int, float], None]:
        """A function counting a duration (seconds) in the histogram at an offset."""
        return self.compiled("observe", "observe")

    def compiled(self, form: str, name: str, **values: Any) -> Recorder:
        """The fast closure ``form`` of :mod:`cachechain.metrics._inline`, over the
        view's thread-local list and the engine's buckets, and ``values``."""
        lay, view = self.layout, self.view
        return closure(
            form,
            name,
            track_max=self.track_max,
            track_sum=self.track_sum,
            tl=view.tl,
            register=view._register,
            bounds=lay.bounds,
            b0=lay.bounds[0],
            b1=lay.bounds[1] if len(lay.bounds) > 1 else -1.0,
            b2=lay.bounds[2] if len(lay.bounds) > 2 else -1.0,
            nb=lay.nb,
            search=bisect.bisect_left,
            **values,
        )

    def _pair(self, rec: Record, args: dict[str, Any]) -> tuple[int, int] | None:
        """The (counter, histogram) offsets of a call that makes exactly one count and
        one observation, else ``None``."""
        slots = self.layout.slots(self.block, rec.name, args)
        steps = sorted((s.step, s.offset, s.per_layer) for s in slots)
        if [s for s, _, _ in steps] != [INC, OBSERVE] or steps[0][2] != steps[1][2]:
            return None
        return steps[0][1], steps[1][1]

    # -- a count and a duration chosen by one bool (and maybe a position) ------------------
    def timed(self, rec: Record) -> Recorder | None:
        """``(layer?, flag, [position,] duration)`` with one count and one duration per
        call; ``None`` when ``rec`` has another form."""
        kinds = tuple(p.type for p in rec.params)
        if kinds == (bool, int, float):
            return self._positioned(rec)
        if kinds not in ((str, bool, float), (bool, float)):
            return None
        flag = rec.params[-2].name
        on, off = self._pair(rec, {flag: True}), self._pair(rec, {flag: False})
        if on is None or off is None:
            return None
        (c1, h1), (c0, h0) = on, off
        if kinds[0] is str:
            view = self.view
            return self.compiled(
                "timed_layer",
                rec.name,
                offsets=view.offsets,
                add_layer=view.add_layer,
                c1=c1,
                h1=h1,
                c0=c0,
                h0=h0,
            )
        acc, observe = self.acc(), self.observe()

        def record(flag: bool, duration: float) -> None:
            a = acc()
            if flag:
                a[c1] += 1
                observe(a, h1, duration)
            else:
                a[c0] += 1
                observe(a, h0, duration)

        return record

    def _positioned(self, rec: Record) -> Recorder | None:
        """``(flag, position, duration)``: a true flag counts by position (the last slot
        for every position past the others), a false one in one slot."""
        flag, position = rec.params[0].name, rec.params[1].name
        first = self._pair(rec, {flag: True, position: 0})
        second = self._pair(rec, {flag: True, position: 1})
        off = self._pair(rec, {flag: False, position: 0})
        if first is None or second is None or off is None or second[0] != first[0] + 1:
            return None
        (c1, h1), (c0, h0) = first, off
        k = self.block.positions
        return self.compiled("positioned", rec.name, k=k, c1=c1, h1=h1, c0=c0, h0=h0)

    # -- gauges ----------------------------------------------------------------------------
    def gauge(self, rec: Record) -> Recorder:
        """``(layer, value)``: keep the latest value; when the record also counts the
        transitions it makes (``on_change``), values without such a count are ignored
        and the others counted when they change the gauge (under the engine's lock)."""
        (m, feed), *_ = [(m, f) for m, f in feeds_of(rec.name) if m.kind == GAUGE]
        values = self.view.gauges[m.name]
        offsets, add_layer = self.view.offsets, self.view.add_layer
        changes = [f for _, f in feeds_of(rec.name) if f.on_change]
        if not changes:

            def record(layer: str, value: int) -> None:
                if layer in offsets or add_layer(layer) is not None:
                    values[layer] = int(value)

            return record
        assert feed.value is not None
        by_value = self._transitions(rec, feed.value)
        acc, slot, engine = self.acc(), self.slot(), self.view.engine

        def record_change(layer: str, value: int) -> None:
            value = int(value)
            slots = by_value.get(value)
            base = None if slots is None else slot(layer)
            if slots is None or base is None:
                return
            a = acc()  # before the lock: a new thread's list is registered under it
            with engine._lock:  # looked up each time: a forked child has a new one
                previous = values.get(layer, 0)
                values[layer] = value
            if value != previous:
                for s in slots:
                    a[base + s.offset] += 1

        return record_change

    def _transitions(self, rec: Record, arg: str) -> dict[int, list[Slot]]:
        """The slots counted when the gauge changes to each value that has them."""
        out = {}
        for m, feed in feeds_of(rec.name):
            if not feed.on_change:
                continue
            for label, source in feed.labels.items():
                if source == Arg(arg):
                    for index in range(len(m.values[label])):
                        out[index] = self.layout.slots(self.block, rec.name, {arg: index})
        return out

    # -- fused records ---------------------------------------------------------------------
    def fused(self, rec: Record) -> Recorder:
        """``(layer, duration)`` of the chain's first layer: one histogram of its own
        (folded into the cells it stands for on read); any other layer (or a chain
        without layers) makes the calls it stands for."""
        view = self.view
        fh = self.block.fused[rec.name]
        return self.compiled(
            "fused",
            rec.name,
            first=view.layers[0] if view.bound else None,
            fallback=stand_in(rec, lambda name: getattr(view, name)),
            fh=fh,
            fh_sum=fh + self.layout.nb,
            fh_max=fh + self.layout.nb + 1,
        )

    # -- anything else ---------------------------------------------------------------------
    def generic(self, rec: Record) -> Recorder:
        """Resolve the slots per distinct label-choosing arguments (remembering up to
        :data:`MAX_PLANS` of them) and walk them."""
        names = rec.param_names
        defaults = tuple(p.default for p in rec.params)
        choosing = [names.index(n) for n in series_params(rec.name) if n != "layer"]
        per_layer = names[:1] == ("layer",)
        layout, block = self.layout, self.block
        plans: dict[tuple[Any, ...], list[Slot]] = {}
        acc, slot, observe = self.acc(), self.slot(), self.observe()

        def resolve(args: Sequence[Any]) -> list[Slot]:
            key = tuple(args[i] for i in choosing)
            found = plans.get(key)
            if found is None:
                found = layout.slots(block, rec.name, dict(zip(names, args, strict=True)))
                if len(plans) < MAX_PLANS:
                    plans[key] = found
            return found

        def record(*args: Any) -> None:
            if len(args) < len(names):
                args = (*args, *defaults[len(args) :])
            slots = resolve(args)
            base = slot(args[0]) if per_layer and slots else 0
            if not slots or base is None:
                return
            a = acc()
            for s in slots:
                at = s.offset + base if s.per_layer else s.offset
                if s.step is INC:
                    a[at] += 1
                elif s.step is ADD:
                    amount = args[s.arg]
                    if amount > 0:
                        a[at] += int(amount)
                else:
                    observe(a, at, args[s.arg])

        return record
