"""examples/metrics/dashboard.json keeps services, chains and layers apart (job and
instance variables in every query, no aggregation that mixes chains), takes its metric
prefix from a variable, and has the panels issue 13 asks for. Its PromQL is checked by
promtool in test_metrics_prometheus.py and evaluated on a real Prometheus in
test_prometheus_real.py."""

from __future__ import annotations

import re

from tests.support.dashboard import (
    DEFAULT_NAMESPACE,
    label_values_query,
    load_dashboard,
    substitute,
    targets,
    variables,
)

SELECTOR = 'job=~"$job",instance=~"$instance",chain=~"$chain"'


def test_the_variables_select_namespace_job_instance_and_chain() -> None:
    found = variables()
    assert list(found) == ["datasource", "namespace", "job", "instance", "chain"]
    namespace = found["namespace"]
    assert namespace["type"] == "textbox" and namespace["query"] == DEFAULT_NAMESPACE
    assert namespace["current"]["value"] == DEFAULT_NAMESPACE
    for name in ("job", "instance", "chain"):
        var = found[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], name
        assert var["allValue"] == ".*", name
        query, label = label_values_query(var["query"]["query"])
        assert label == name and "${namespace}_" in query, query
    assert 'job=~"$job"' in found["instance"]["query"]["query"]
    assert 'job=~"$job",instance=~"$instance"' in found["chain"]["query"]["query"]


def test_every_query_selects_by_job_instance_and_chain() -> None:
    for target in targets():
        expr = target.expr
        assert "cache_chain" not in expr, expr  # the prefix is ${namespace}
        selectors = re.findall(r"(\$\{namespace\}_\w+|\bup)\{([^}]*)\}", expr)
        assert selectors, expr
        assert not re.search(r"\$\{namespace\}_\w+(?!\{|\w)", expr), expr  # bare metric
        for metric, selector in selectors:
            wanted = SELECTOR if metric != "up" else 'job=~"$job",instance=~"$instance"'
            assert selector.startswith(wanted), (target.panel, metric, selector)


def test_no_aggregation_mixes_services_or_chains() -> None:
    clauses = 0
    for target in targets():
        if target.expr.startswith("up{"):
            continue
        assert re.search(r"\b(sum|max|min|avg|count)\s*\(", target.expr) is None, target.expr
        for clause in re.findall(r"\bby \(([^)]*)\)", target.expr):
            clauses += 1
            labels = {label.strip() for label in clause.split(",")}
            assert {"job", "instance", "chain"} <= labels, (target.panel, target.expr)
    assert clauses > 40


def test_the_breaker_panel_ranks_open_above_half_open() -> None:
    (state,) = [t for t in targets() if t.panel == "Circuit breaker state"]
    assert "_circuit_breaker_state{" in state.expr and "_circuit_state{" not in state.expr
    assert 'state="open"' in state.expr and 'state="half_open"' in state.expr
    panel = next(p for p in load_dashboard()["panels"] if p["title"] == "Circuit breaker state")
    texts = {
        k: v["text"] for k, v in panel["fieldConfig"]["defaults"]["mappings"][0]["options"].items()
    }
    assert texts == {"0": "closed", "1": "half-open", "2": "open"}
    trials = [t.expr for t in targets() if "half-open trials" in t.panel.lower()]
    assert any(
        e.startswith("sum by (job, instance, chain, layer) (increase(")
        and "_circuit_transitions_total{" in e
        and 'to="half_open"' in e
        for e in trials
    ), trials


def test_refused_calls_are_in_the_hit_ratio_and_beside_the_errors() -> None:
    (ratio,) = [t.expr for t in targets() if t.panel == "Hit rate by layer"]
    numerator, denominator = ratio.split(" / (", 1)
    assert "_hits_total{" in numerator and "_circuit_rejected_total{" not in numerator
    for name in ("hits_total", "misses_total", "circuit_rejected_total", "errors_total"):
        assert f"${{namespace}}_{name}{{" in denominator, name
    errors = [t.expr for t in targets() if t.panel == "Error rate and refused calls by layer"]
    assert any("_errors_total{" in e for e in errors)
    assert any("_circuit_rejected_total{" in e for e in errors)


def test_the_new_series_have_panels() -> None:
    exprs = " ".join(t.expr for t in targets())
    for name in (
        "circuit_breaker_state",
        "backfills_skipped_total",
        "repairs_pending",
        "layer_nodes_down",
        "layer_connections",
        "layer_pool_exhausted_total",
        "layer_corrupt_values_total",
        "info",
        "layer_info",
        "invalidation_lag_seconds_bucket",
        "fail_safe_served_total",
        "leases_total",
        "lease_wait_duration_seconds_bucket",
        "circuit_rejected_total",
    ):
        assert f"${{namespace}}_{name}{{" in exprs, name


def test_substitution_leaves_no_variable_and_ids_are_unique() -> None:
    values = {"namespace": "app_cache", "job": "a", "instance": "b", "chain": "c"}
    for target in targets():
        expr = substitute(target.expr, values)
        assert "app_cache_" in expr or expr.startswith("up{"), expr
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:  # no two panels overlap on the 24-column grid
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine
