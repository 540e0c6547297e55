"""The ``cachechain`` command (also ``python -m cachechain``).

``cachechain demo`` runs a chain under load; ``cachechain plugins [--json]`` lists the
installed metrics exporters with the distribution and version providing each.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import CacheError
from ._validate import check_count, check_positive, check_seconds

if TYPE_CHECKING:
    from ._plugins import ExporterInfo, ExporterReport, PluginOrigin

__all__ = ["main"]

T = TypeVar("T")


def _option(parse: Callable[[str], Any], check: Callable[..., T]) -> Callable[[str], T]:
    """An argparse ``type``: ``parse`` the text, then ``check`` the value with a
    :mod:`cachechain._validate` check, whose message becomes argparse's error."""

    def convert(text: str) -> T:
        return check(parse(text), "the value", error=argparse.ArgumentTypeError)

    convert.__name__ = parse.__name__  # argparse: "invalid float value: 'x'"
    return convert


_seconds = _option(float, check_seconds)
_count = _option(int, check_count)
_positive = _option(float, check_positive)


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
    demo.add_argument("--seconds", type=_seconds, default=5.0, help="run time (s)")
    demo.add_argument("--threads", type=_count, default=8)
    demo.add_argument("--keys", type=_count, default=20_000)
    demo.add_argument("--skew", type=_positive, default=1.1, help="Zipf exponent")
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
    demo.add_argument("--timeout", type=_seconds, default=0.1, help="L2 call timeout (s)")
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


def _list_plugins(as_json: bool) -> int:
    """Print the exporters, conflicts and broken plugins; 1 if any are broken or clash."""
    import warnings

    from ._exporters import get_manager
    from ._plugins import PluginLoadWarning

    with warnings.catch_warnings():  # broken plugins are listed instead
        warnings.simplefilter("ignore", PluginLoadWarning)
        report = get_manager().report()
    print(_as_json(report) if as_json else _as_table(report))
    return 1 if report.conflicts or report.failures else 0


def _as_table(report: ExporterReport) -> str:
    rows = [("EXPORTER", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION")]
    rows += [
        (e.name, e.distribution or "-", e.version or "-", e.plugin, e.description)
        for e in report.exporters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    cells = [[c.ljust(w) for c, w in zip(row[:4], widths, strict=True)] for row in rows]
    lines = ["  ".join([*left, row[4]]).rstrip() for left, row in zip(cells, rows, strict=True)]
    lines += [
        f"conflict: {c.describe()}; the name is unusable until one is removed"
        for c in report.conflicts
    ]
    lines += [f"broken {f.describe()}: {f.error}" for f in report.failures]
    return "\n".join(lines)


def _as_json(report: ExporterReport) -> str:
    def origin(o: PluginOrigin) -> dict[str, Any]:
        return {"plugin": o.plugin, "distribution": o.distribution, "version": o.version}

    def exporter(e: ExporterInfo) -> dict[str, Any]:
        return {"name": e.name, "description": e.description, "builtin": e.builtin, **origin(e)}

    data = {
        "exporters": [exporter(e) for e in report.exporters],
        "conflicts": [
            {"name": c.name, "claims": [exporter(e) for e in c.claims]} for c in report.conflicts
        ],
        "failures": [{**origin(f), "error": f.error} for f in report.failures],
    }
    return json.dumps(data, indent=2, sort_keys=True)


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
        return _list_plugins(args.json)
    return 2  # pragma: no cover - argparse refuses unknown commands
