"""StatsdExporter against cachechain's collector conformance suite
(:class:`cachechain.testing.MetricsCollectorTests`), sending to a plain UDP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cachechain.testing import MetricsCollectorTests

from cachechain_statsd.exporter import StatsdExporter

from .conftest import Receiver


class TestStatsdExporter(MetricsCollectorTests):
    """Flushed from the test's thread (no sending thread), every timer value kept."""

    @pytest.fixture()
    def collector(self, receiver: Receiver) -> Iterator[StatsdExporter]:
        exporter = StatsdExporter(
            "127.0.0.1", receiver.port, start=False, environ={}, timer_sample_rate=1.0
        )
        yield exporter
        exporter.close()

    def read_figures(self, collector: Any) -> bool:
        return bool(collector.flush())


class TestStatsdExporterWithTagsAndItsThread(MetricsCollectorTests):
    """DogStatsD tags, the sending thread running, timers sampled as by default."""

    @pytest.fixture()
    def collector(self, receiver: Receiver) -> Iterator[StatsdExporter]:
        exporter = StatsdExporter("127.0.0.1", receiver.port, tags=True, environ={})
        yield exporter
        exporter.close()

    def read_figures(self, collector: Any) -> bool:
        return bool(collector.flush())
