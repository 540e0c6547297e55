"""The exporter's options: checked, with the ``STATSD_*`` environment filling in what is
not given. Every error is a :class:`~cachechain.ConfigError` that names the option (or
the variable)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachechain import ConfigError

from ._wire import clean

__all__ = ["DEFAULT_MAX_PACKETS", "DEFAULT_MAX_UDP_SIZE", "DEFAULT_PREFIX", "Options", "Resolver"]

#: The prefix of every metric name unless ``prefix`` or ``STATSD_PREFIX`` says otherwise.
DEFAULT_PREFIX = "cache_chain"
#: The largest datagram unless ``max_udp_size`` or ``STATSD_MAXUDPSIZE`` says otherwise:
#: an Ethernet MTU of 1500 less IP and UDP headers and some room for tunnels (loopback
#: takes 64 KB; across the Internet, say 512).
DEFAULT_MAX_UDP_SIZE = 1432
#: Datagrams one exporter sends a second at most, unless ``max_packets`` says otherwise
#: (counters and gauges are always sent; timer values give way).
DEFAULT_MAX_PACKETS = 100

Resolver = Callable[[str, int, int, int], Sequence[tuple[Any, ...]]]


def _check_host(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{field} must be a host name or address without spaces, got {value!r}")
    return value.strip()


def _check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{field} must be an int in {low}-{high}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field} must be an int in {low}-{high}, got {value!r}")
    return value


def _check_prefix(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{field} must be a str, got {value!r}")
    parts = [p for p in value.strip().split(".") if p]
    return ".".join(clean(p) for p in parts)


def _check_bool(value: Any, field: str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{field} must be true or false, got {value!r}")


def _check_seconds(value: Any, field: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 3600
    ):
        raise ConfigError(f"{field} must be a number of seconds in (0, 3600], got {value!r}")
    return float(value)


def _check_period(rate: Any) -> int:
    """Every N-th event keeps its duration: N for ``timer_sample_rate`` (0: none)."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not (rate == 0 or 0.000001 <= rate <= 1)
    ):
        raise ConfigError(
            f"timer_sample_rate must be 0 (no timers) or a number in [0.000001, 1], got {rate!r}"
        )
    return round(1 / rate) if rate else 0


@dataclass(frozen=True)
class Options:
    """The exporter's checked options (see :class:`~cachechain_statsd.StatsdExporter`);
    ``sample_period``: every N-th event of a series keeps its duration (0: timers off);
    ``max_packets``: datagrams a second at most (counters and gauges excepted)."""

    host: str
    port: int
    prefix: str
    max_udp_size: int
    ipv6: bool
    tags: bool
    flush_interval: float
    sample_period: int
    max_samples: int
    max_packets: int = DEFAULT_MAX_PACKETS

    @classmethod
    def resolve(cls, env: Mapping[str, str], **given: Any) -> Options:
        """Check the options ``given`` (``None``: from ``env``, else the default).
        Raises :class:`~cachechain.ConfigError` naming the option or the variable."""

        def pick(name: str, var: str, default: str, check: Callable[..., Any]) -> Any:
            value = given[name]
            if value is None:
                value = check(env.get(var, default), var)
            return check(value, name)

        return cls(
            host=pick("host", "STATSD_HOST", "localhost", _check_host),
            port=pick("port", "STATSD_PORT", "8125", lambda v, f: _check_int(v, f, 1, 65535)),
            prefix=pick("prefix", "STATSD_PREFIX", DEFAULT_PREFIX, _check_prefix),
            max_udp_size=pick(
                "max_udp_size",
                "STATSD_MAXUDPSIZE",
                str(DEFAULT_MAX_UDP_SIZE),
                lambda v, f: _check_int(v, f, 64, 65_000),
            ),
            ipv6=pick("ipv6", "STATSD_IPV6", "0", _check_bool),
            tags=_check_bool(given["tags"], "tags"),
            flush_interval=_check_seconds(given["flush_interval"], "flush_interval"),
            sample_period=_check_period(given["timer_sample_rate"]),
            max_samples=_check_int(given["max_samples"], "max_samples", 1, 10_000_000),
            max_packets=_check_int(
                given.get("max_packets", DEFAULT_MAX_PACKETS), "max_packets", 1, 1_000_000
            ),
        )
