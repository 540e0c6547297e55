"""The ``cachechain`` command (also ``python -m cachechain``).

``cachechain demo`` runs a chain under load; ``cachechain plugins [--json]`` lists the
installed metrics exporters with the distribution and version providing each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._errors import CacheError

__all__ = ["main"]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``cachechain`` command."""
    parser = argparse.ArgumentParser(prog="cachechain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a chain under a skewed multi-threaded load")
    demo.add_argument(
        "--memcached",
        metavar="HOST:PORT",
        help="use this memcached as L2 (default: an in-process stand-in)",
    )
    demo.add_argument("--seconds", type=_positive_float, default=5.0, help="run time (s)")
    demo.add_argument("--threads", type=_positive_int, default=8)
    demo.add_argument("--keys", type=_positive_int, default=20_000)
    demo.add_argument("--skew", type=_positive_float, default=1.1, help="Zipf exponent")
    demo.add_argument(
        "--fault",
        choices=["stop", "blackhole"],
        help="make L2 fail part way through: refuse calls, or hang until timeout",
    )
    demo.add_argument(
        "--fault-at",
        type=_fraction,
        default=0.3,
        help="when the fault starts, as a fraction of the run",
    )
    demo.add_argument(
        "--fault-for",
        type=_fraction,
        default=0.3,
        help="how long it lasts, as a fraction of the run",
    )
    demo.add_argument("--timeout", type=_positive_float, default=0.1, help="L2 call timeout (s)")
    demo.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0: any free port)",
    )
    plugins = sub.add_parser(
        "plugins",
        help="list the installed metrics exporters and the distributions providing them",
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _plugins(as_json: bool) -> int:
    """Print the exporters, conflicts and broken plugins; 1 if any are broken or clash."""
    import json
    import warnings

    from ._exporters import PluginLoadWarning, exporter_report

    with warnings.catch_warnings():  # broken plugins are listed below instead
        warnings.simplefilter("ignore", PluginLoadWarning)
        report = exporter_report()
    status = 1 if report.conflicts or report.failures else 0
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return status
    rows = [("EXPORTER", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION")]
    for info in report.exporters:
        rows.append(
            (
                info.name,
                info.distribution or "-",
                info.version or "-",
                info.plugin,
                info.description,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]).rstrip())
    for conflict in report.conflicts:
        print(f"conflict: {conflict.describe()}; the name is unusable until one is removed")
    for failure in report.failures:
        where = failure.distribution or "unknown distribution"
        version = f" {failure.version}" if failure.version else ""
        print(f"broken plugin {failure.plugin!r} ({where}{version}): {failure.error}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cachechain`` command with ``argv``; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import DemoOptions, run_demo

        options = DemoOptions(
            seconds=args.seconds,
            threads=args.threads,
            keys=args.keys,
            skew=args.skew,
            memcached=args.memcached,
            fault=args.fault,
            fault_at=args.fault_at,
            fault_for=args.fault_for,
            timeout=args.timeout,
            metrics_port=args.metrics_port,
        )
        try:
            run_demo(options)
        except CacheError as exc:
            print(f"cachechain demo: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "plugins":
        return _plugins(args.json)
    return 2  # pragma: no cover - argparse refuses unknown commands
