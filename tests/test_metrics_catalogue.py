"""The metrics catalogue: one declaration per event and per metric, and everything that
is derived from it (the contract's methods, the guard, the forwarders, the accumulator
slots, the Prometheus families, the snapshot fields, the docs)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from cachechain.metrics import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    METRICS,
    RECORD_METHODS,
    RECORDS,
    SEED_METHODS,
    Arg,
    CacheMetrics,
    ChainMetrics,
    CollectorGuard,
    MetricsCollector,
    feeds_of,
    find_metric,
    find_record,
    forward_records,
    series_params,
    stand_in,
)
from cachechain.metrics._engine import AccumulatingCollector
from cachechain.metrics._layout import Layout
from cachechain.metrics._memory import MemoryCollector
from cachechain.metrics._prometheus import FAMILIES

ROOT = Path(__file__).resolve().parent.parent


def test_the_contract_has_one_method_per_record_with_its_parameters() -> None:
    for rec in RECORDS:
        method = getattr(MetricsCollector, rec.name)
        params = list(inspect.signature(method).parameters.values())[1:]
        assert [p.name for p in params] == list(rec.param_names), rec.name
        for p, declared in zip(params, rec.params, strict=True):
            assert p.annotation == declared.type.__name__, (rec.name, p.name)
            default = None if p.default is inspect.Parameter.empty else p.default
            assert default == declared.default, (rec.name, p.name)
        assert method.__doc__, rec.name
    declared = {n for n in vars(MetricsCollector) if n.startswith("record_")}
    assert declared == set(RECORD_METHODS)
    assert RECORD_METHODS[:8] == SEED_METHODS


def test_every_feed_names_a_record_and_its_arguments() -> None:
    for m in METRICS:
        assert m.kind in (COUNTER, GAUGE, HISTOGRAM), m.name
        assert m.labels[0] == "chain", m.name
        assert (m.kind == HISTOGRAM) == bool(m.buckets) == (m.unit == "seconds"), m.name
        assert m.merge in ("sum", "max"), m.name
        if m.one_hot_of is not None or m.info:  # gauges fed by no record call
            assert m.kind == GAUGE and not m.feeds and m.merge == "max", m.name
            assert not (m.info and m.one_hot_of), m.name
            if m.one_hot_of is not None:
                source = find_metric(m.one_hot_of)
                assert source.kind == GAUGE and source.labels == m.labels[:-1], m.name
                assert m.values[m.extra_labels[-1]], m.name
            continue
        assert m.feeds, m.name
        for feed in m.feeds:
            rec = find_record(feed.record)
            assert not rec.stands_for, (m.name, "a fused record feeds nothing itself")
            assert set(feed.labels) == set(m.extra_labels), m.name
            if m.per_layer:
                assert "layer" in rec.param_names, m.name
            sources = [s.name for s in feed.labels.values() if isinstance(s, Arg)]
            for name in [*sources, *([feed.when[0]] if feed.when else [])]:
                assert name in rec.param_names, (m.name, name)
            if feed.value is not None:
                assert rec.param(feed.value).type in (int, float), (m.name, feed.value)
            elif m.kind != COUNTER:
                raise AssertionError(f"{m.name}: a {m.kind} needs a value")
        for label, value in [(k, v) for f in m.feeds for k, v in f.labels.items()]:
            if not isinstance(value, Arg) and label != m.positions:
                assert value in m.values[label], (m.name, label, value)


def test_every_record_feeds_something_and_fused_records_stand_for_others() -> None:
    for rec in RECORDS:
        if rec.stands_for:
            for target, fixed in rec.stands_for:
                assert set(fixed) == set(find_record(target).param_names), rec.name
        else:
            assert list(feeds_of(rec.name)), rec.name
    assert series_params("record_error") == ("layer", "operation", "error_type")
    assert series_params("record_queue_depth") == ("layer",)
    assert series_params("record_chain_get") == ("hit", "layer_index")


def test_snapshot_fields_are_the_dataclasses_fields() -> None:
    layer_fields = {f.name for f in dataclasses.fields(CacheMetrics)}
    chain_fields = {f.name for f in dataclasses.fields(ChainMetrics)}
    filled: dict[str, set[str]] = {"layer": set(), "chain": set()}
    for m in METRICS:
        for f in m.fields:
            scope = "layer" if m.per_layer else "chain"
            assert f.name in (layer_fields if m.per_layer else chain_fields), (m.name, f.name)
            assert f.name not in filled[scope], f"{f.name} filled twice"
            filled[scope].add(f.name)
            assert set(f.where) <= set(m.extra_labels), (m.name, f.name)
            assert f.by is None or f.by in m.extra_labels, (m.name, f.name)
    assert filled == {"layer": layer_fields, "chain": chain_fields}


def test_names_follow_the_conventions() -> None:
    for m in METRICS:
        assert re.fullmatch(r"[a-z_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == COUNTER), m.name
        assert m.name.endswith("_seconds") == (m.kind == HISTOGRAM), m.name
        assert find_metric(m.name) is m
    assert [m.statsd for m in METRICS[:4]] == [
        "hits",
        "misses",
        "errors",
        "operation_duration",
    ]
    with pytest.raises(KeyError):
        find_metric("nope")
    assert FAMILIES == METRICS


def test_the_docs_table_is_the_catalogue() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    row = r"^\| `cache_chain_([a-z_]+)` \| (\w+) \| ([a-z_, ]+) \| (.+) \|$"
    rows = re.findall(row, text, re.M)
    documented = {name: (kind, tuple(labels.split(", "))) for name, kind, labels, _ in rows}
    assert documented == {m.name: (m.kind, m.labels) for m in METRICS}


def test_the_accumulator_slots_are_derived_from_the_catalogue() -> None:
    layout = Layout((0.1, 1.0))
    chain = layout.chain(2)
    per_layer = {m.name for m, _, _ in layout.layer.cells}
    assert per_layer == {m.name for m in METRICS if m.per_layer and m.kind != GAUGE}
    assert len({offset for _, _, offset in layout.layer.cells}) == len(layout.layer.cells)
    assert [cell for m, cell, _ in chain.cells if m.name == "requests_total"] == [
        ("hit", 0),
        ("hit", 1),
        ("hit", 2),
        ("miss", "none"),
    ]
    errors = find_metric("errors_total")
    assert layout.layer.slot(errors, ("get", "strange")) == layout.layer.slot(
        errors, ("get", "other")
    )
    assert layout.layer.slot(find_metric("circuit_transitions_total"), ("sideways",)) is None
    requests = find_metric("requests_total")
    assert chain.slot(requests, ("hit", 7)) == chain.slot(requests, ("hit", 2))
    assert chain.fused == {"record_first_layer_hit": 0}  # small offsets first


def test_every_collector_has_every_record_method() -> None:
    guard = CollectorGuard(MemoryCollector())
    for name in RECORD_METHODS:
        assert callable(getattr(guard, name)), name
        assert name in vars(AccumulatingCollector), name

    @forward_records(lambda self: self.target)
    class Forwarding(MetricsCollector):
        def __init__(self, target: Any) -> None:
            self.target = target

    memory = MemoryCollector()
    Forwarding(memory).record_get("L1", True, 0.001)
    Forwarding(memory).record_write_dropped("L1")
    snap = memory.snapshot().layer_metrics["L1"]
    assert (snap.hits, snap.dropped_by_reason) == (1, {"queue_full": 1})
    assert Forwarding.record_get.__doc__


def test_a_fused_record_stands_in_for_the_calls_it_stands_for() -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def method(name: str) -> Any:
        return lambda *args: calls.append((name, args))

    fused = stand_in(find_record("record_first_layer_hit"), method)
    assert fused is not None
    fused("L1", 0.25)
    assert calls == [("record_get", ("L1", True, 0.25)), ("record_chain_get", (True, 0, 0.25))]
    assert stand_in(find_record("record_get"), method) is None


def test_a_duck_typed_collector_gets_the_fused_calls_through_the_guard() -> None:
    class Seed:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def __getattr__(self, name: str) -> Any:
            if name in SEED_METHODS:
                return lambda *args: self.calls.append(name)
            raise AttributeError(name)

    seed = Seed()
    guard = CollectorGuard(seed)
    guard.record_first_layer_hit("L1", 0.001)
    guard.record_load(True, 0.1)  # not a seed method: nothing
    assert seed.calls == ["record_get", "record_chain_get"]
