"""The testing kit: test doubles, and conformance suites for layers and collectors.

Test doubles (no pytest needed):

- :class:`FakeClock`: a clock that moves only when told to (``clock.advance(5.0)``);
  pass it wherever cachechain takes a ``clock``.
- :class:`FakeLayer`: a dict-backed layer on a :class:`FakeClock` that records its
  calls and fails (``fail``) or blocks (``block_get``, ``block_set``, ``block_delete``)
  on demand.

Conformance suites (they need pytest): classes of tests that a layer or collector
author subclasses in their own test module, as Django's cache backends subclass
``BaseCacheTests``. The subclass gives the object under test through a fixture:

.. code-block:: python

    import pytest
    from cachechain.testing import CacheLayerTests, MetricsCollectorTests

    class TestMyLayer(CacheLayerTests):
        @pytest.fixture()
        def layer(self, clock):  # clock: a FakeClock for the layer's TTLs
            layer = MyLayer("L2", clock=clock)
            yield layer
            layer.close()

    class TestMyCollector(MetricsCollectorTests):
        @pytest.fixture()
        def collector(self):
            return MyCollector()

        def read_figures(self, collector):  # optional: lets the suite see hooks run
            collector.flush()
            return True

- :class:`CacheLayerTests`: the :class:`~cachechain.layers.CacheLayer` contract (misses
  are ``MISSING``, TTLs and ``get_with_ttl``, ``max_ttl``, batch methods and what
  ``set_many`` returns, deletes, invalid TTLs, keys and values, ``close``, threads). A
  layer that cannot take a clock overrides the ``clock`` fixture to return ``None``,
  and its TTL tests then wait (briefly) in real time.
- :class:`MetricsCollectorTests`: the :class:`~cachechain.metrics.MetricsCollector`
  contract (every ``record_*`` method, found on the class, takes its documented
  arguments and never raises, bound or not and from many threads; ``bind_chain``;
  ``add_refresh_hook``; ``close`` if present; a real chain reporting to it meets no
  error).

Every test is a plain method: override one to adapt it, or set it to ``None`` in the
subclass to drop it. ``docs/testing.md`` has the whole guide.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from ._fakes import FakeClock, FakeLayer

if TYPE_CHECKING:
    from ._layer_suite import CacheLayerTests
    from ._metrics_suite import MetricsCollectorTests

__all__ = ["CacheLayerTests", "FakeClock", "FakeLayer", "MetricsCollectorTests"]

# The suites import pytest: only when asked for, so the doubles work without it.
_SUITES = {
    "CacheLayerTests": "cachechain.testing._layer_suite",
    "MetricsCollectorTests": "cachechain.testing._metrics_suite",
}


def __getattr__(name: str) -> Any:
    if name in _SUITES:
        module = _SUITES[name]
        if module not in sys.modules:
            import pytest

            # Failed asserts in the suites then explain themselves, as in a test module.
            pytest.register_assert_rewrite(module)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
