"""The example dashboard and alert rules as the tests read them: every query of
``examples/metrics/dashboard.json`` with its template variables substituted, the
variables' own queries as PromQL, and alert expressions turned into probes that return
a sample for every series they compare (``> 0.05`` becomes ``> bool 0.05``)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "metrics"
DASHBOARD = EXAMPLES / "dashboard.json"
ALERTS = EXAMPLES / "alerts.yml"
ALERTS_TEST = EXAMPLES / "alerts_test.yml"

#: The metric prefix the dashboard's ``namespace`` variable stands for by default.
DEFAULT_NAMESPACE = "cache_chain"


@dataclass(frozen=True)
class Target:
    """One query of a dashboard panel: the panel's title and type, the query's refId and
    its expression as written (template variables unsubstituted)."""

    panel: str
    panel_type: str
    ref: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    """The parsed dashboard.json."""
    with open(DASHBOARD) as f:
        data: dict[str, Any] = json.load(f)
    return data


def targets(dashboard: Mapping[str, Any] | None = None) -> list[Target]:
    """Every query of every panel, rows included (a collapsed row keeps its panels)."""
    data = load_dashboard() if dashboard is None else dashboard
    found = []
    for panel in data["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if "expr" in target:
                    found.append(
                        Target(inner["title"], inner["type"], target["refId"], target["expr"])
                    )
    return found


def variables(dashboard: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The template variables by name."""
    data = load_dashboard() if dashboard is None else dashboard
    return {v["name"]: v for v in data["templating"]["list"]}


def substitute(expr: str, values: Mapping[str, str], rate_interval: str = "5m") -> str:
    """``expr`` with Grafana's ``$__rate_interval`` and each ``$name`` / ``${name}`` of
    ``values`` replaced; raises ValueError if a ``$`` variable is left over."""
    out = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(values, key=len, reverse=True):
        out = out.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if "$" in out:
        raise ValueError(f"a template variable is left in {out!r}")
    return out


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def label_values_query(query: str) -> tuple[str, str]:
    """A Grafana ``label_values(selector, label)`` variable query as PromQL that returns
    one series per value (``group by (label) (selector)``), and the label; raises
    ValueError for another kind of query."""
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    label = match["label"]
    return f"group by ({label}) ({match['selector']})", label


# A comparison with a number on its right: "> 0.05", "== 0", "< 0.5 * (...)".
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?=[0-9.])")


def probe(expr: str) -> str:
    """An alert expression whose comparisons with a number return 0 or 1 for every
    series instead of filtering (``x > 0.05`` becomes ``x > bool 0.05``): it returns
    data whenever the series the alert watches exist, firing or not."""
    return _COMPARISON.sub(lambda m: f"{m[1]} bool ", expr)


def alert_names() -> list[str]:
    """The alert names of alerts.yml, in file order (read without a YAML library)."""
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", ALERTS.read_text(), flags=re.M)


def without_alert(name: str) -> str:
    """alerts.yml's text without the rule ``name`` (its ``- alert:`` item, up to the next
    item or comment line at the same indentation)."""
    lines = ALERTS.read_text().splitlines(keepends=True)
    out: list[str] = []
    skipping = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("- alert:"):
            skipping = stripped == f"- alert: {name}"
        elif skipping and stripped.startswith("#") and line.startswith("      #"):
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)
