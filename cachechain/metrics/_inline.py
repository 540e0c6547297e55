"""The fast record closures, compiled once per engine flavour.

An L1 hit with a collector costs a handful of list operations; testing ``track_sum``
and ``track_max`` on every call would cost about as much as one of them (some 130
machine instructions per hit, counted with callgrind). So the step that counts a
duration in a histogram is written once, here, as source text, and compiled into each
fast closure with only the lines the engine needs: a bucket count, plus the sum
(``track_sum``), plus the maximum (``track_max``). The closures are what the templates
below say, nothing more; :func:`closure` compiles a template once per flavour (cached)
and binds it to a view's values.

A histogram cell is ``nb`` bucket slots (the last above every bound), then its sum and
its maximum (see :mod:`cachechain.metrics._layout`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["COMMON", "closure"]


def _observe(
    h: str, total: str, top: str, *, track_sum: bool, track_max: bool, weight: str = ""
) -> list[str]:
    """Count ``duration`` in the histogram at ``h`` (sum at ``total``, max at ``top``),
    ``weight`` times when given (the name of an int). The first three buckets (an
    in-process hit: up to 2.5 us by default) are found by comparisons, one per bucket,
    the others by a binary search."""
    n = weight or "1"
    lines = [
        "if duration <= b0:",
        f"    a[{h}] += {n}",
        "elif duration <= b1:",
        f"    a[{h} + 1] += {n}",
        "elif duration <= b2:",
        f"    a[{h} + 2] += {n}",
        "else:",
        f"    a[{h} + search(bounds, duration)] += {n}",
    ]
    if track_sum:
        lines.append(f"a[{total}] += duration * {weight}" if weight else f"a[{total}] += duration")
    if track_max:
        lines += [f"if duration > a[{top}]:", f"    a[{top}] = duration"]
    return lines


_ACC = """\
try:
    a = tl.a
except AttributeError:
    a = register()"""

#: What every template closes over: the view's thread-local list and its registration,
#: the buckets' bounds, the first three bounds (``-1.0`` for those past the last bound,
#: so that no duration stops there), the bucket count and the bucket search.
COMMON = ("tl", "register", "bounds", "b0", "b1", "b2", "nb", "search")

# Each template: the other values it closes over, its body (``{acc}``: the calling
# thread's list into ``a``; ``{observe}``: count ``duration`` in the histogram at
# ``h``), and the places of that histogram's first bucket, sum and maximum.
_TEMPLATES: dict[str, tuple[str, str, tuple[str, str, str]]] = {
    # A count and a duration chosen by one bool, for a layer (record_get, record_set...).
    "timed_layer": (
        "offsets, add_layer, c1, h1, c0, h0",
        """\
def record(layer, flag, duration):
    {acc}
    base = offsets.get(layer)
    if base is None:
        base = add_layer(layer)
        if base is None:
            return
    if flag:
        a[base + c1] += 1
        h = base + h1
    else:
        a[base + c0] += 1
        h = base + h0
    {observe}
""",
        ("h", "h + nb", "h + nb + 1"),
    ),
    # The same for the chain, counted by position when the flag is true (a position
    # past the others in the last slot): record_chain_get.
    "positioned": (
        "k, c1, h1, c0, h0",
        """\
def record(flag, index, duration):
    {acc}
    if flag:
        a[c1 + (index if 0 <= index < k else k)] += 1
        h = h1
    else:
        a[c0] += 1
        h = h0
    {observe}
""",
        ("h", "h + nb", "h + nb + 1"),
    ),
    # A fused record of the first layer in a histogram of its own; any other layer
    # makes the calls it stands for. The hottest call of all (an L1 hit).
    "fused": (
        "first, fallback, fh, fh_sum, fh_max",
        """\
def record(layer, duration):
    if layer is not first and layer != first:
        return fallback(layer, duration)
    {acc}
    {observe}
    return None
""",
        ("fh", "fh_sum", "fh_max"),
    ),
    # A timed first-layer hit standing for ``weight`` hits (a HitSampler's ``timed``),
    # in a histogram of its own.
    "sampled": (
        "sh, sh_sum, sh_max",
        """\
def record(duration, weight):
    {acc}
    {observe}
    return None
""",
        ("sh", "sh_sum", "sh_max"),
    ),
    # Count one duration in the histogram at h of the list a (for the other records).
    "observe": (
        "",
        """\
def record(a, h, duration):
    {observe}
""",
        ("h", "h + nb", "h + nb + 1"),
    ),
}


@functools.cache
def _factory(form: str, track_max: bool, track_sum: bool) -> Callable[..., Any]:
    params, body, (h, total, top) = _TEMPLATES[form]
    weight = "weight" if form == "sampled" else ""
    observe = _observe(h, total, top, track_sum=track_sum, track_max=track_max, weight=weight)
    body = body.replace("{acc}", _ACC.replace("\n", "\n    "))
    body = body.replace("{observe}", "\n    ".join(observe))
    nested = "\n".join(f"    {line}" if line else line for line in body.splitlines())
    names = ", ".join((*COMMON, params)) if params else ", ".join(COMMON)
    source = f"def factory({names}):\n{nested}\n    return record\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<cachechain.metrics {form}>", "exec"), namespace)
    factory: Callable[..., Any] = namespace["factory"]
    return factory


def closure(
    form: str, name: str, *, track_max: bool, track_sum: bool, **values: Any
) -> Callable[..., None]:
    """The closure of template ``form`` for an engine tracking the maximum and/or the
    sum, over ``values`` (:data:`COMMON` and the template's own names), named ``name``.
    Raises ``KeyError`` for an unknown form and ``TypeError`` for missing or extra
    values."""
    fn: Callable[..., None] = _factory(form, track_max, track_sum)(**values)
    fn.__name__ = fn.__qualname__ = name
    return fn
