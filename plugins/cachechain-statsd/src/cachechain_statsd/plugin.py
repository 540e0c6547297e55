"""The pluggy plugin: registers the ``statsd`` exporter with cachechain.

Declared in this distribution's entry points (group ``cachechain.exporters``), so that
``pip install cachechain-statsd`` is all it takes for a config to say
``{"exporter": "statsd"}``. Importing this module does not import the ``statsd``
package: the factory does, when an exporter is created.
"""

from __future__ import annotations

from typing import Any

from cachechain.exporters import ExporterRegistry, hookimpl

__all__ = ["cachechain_register_exporters", "create_statsd_exporter"]


def create_statsd_exporter(
    host: str | None = None,
    port: int | None = None,
    prefix: str | None = None,
    *,
    tags: bool = False,
    flush_interval: float = 1.0,
    timer_sample_rate: float = 0.1,
    max_udp_size: int | None = None,
    max_packets: int | None = None,
    max_samples: int = 5000,
    ipv6: bool | None = None,
) -> Any:
    """Build a :class:`~cachechain_statsd.exporter.StatsdExporter` from config options
    (see its documentation; ``STATSD_HOST``, ``STATSD_PORT``, ``STATSD_PREFIX``,
    ``STATSD_MAXUDPSIZE`` and ``STATSD_IPV6`` fill in what is not given). Raises
    :class:`~cachechain.ConfigError` naming the option for a bad value."""
    from ._options import DEFAULT_MAX_PACKETS
    from .exporter import StatsdExporter

    return StatsdExporter(
        host,
        port,
        prefix,
        tags=tags,
        flush_interval=flush_interval,
        timer_sample_rate=timer_sample_rate,
        max_udp_size=max_udp_size,
        max_packets=DEFAULT_MAX_PACKETS if max_packets is None else max_packets,
        max_samples=max_samples,
        ipv6=ipv6,
    )


@hookimpl
def cachechain_register_exporters(registry: ExporterRegistry) -> None:
    """Register the ``statsd`` exporter."""
    registry.add(
        "statsd",
        create_statsd_exporter,
        description="StatsD over UDP (plain dotted names or DogStatsD tags), batched",
    )
