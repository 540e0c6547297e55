"""Exporters by name: pluggy discovery, plugin failures, create_exporter, the CLI, and
the StatsD plugin end to end against a real daemon (found through its entry point)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cachechain import Chain, MemoryLayer
from cachechain import _exporters as ex
from cachechain._cli import main
from cachechain._errors import ConfigError
from cachechain._exporters import ExporterManager
from cachechain._settings import chain_config_from_mapping
from cachechain.exporters import (
    ENTRY_POINT_GROUP,
    ExporterConflictError,
    ExporterRegistry,
    PluginLoadWarning,
    UnknownExporterError,
    create_exporter,
    hookimpl,
)
from cachechain.metrics import MetricsCollector, NoOpCollector
from cachechain.metrics._fanout import FanoutCollector
from cachechain.metrics._memory import MemoryCollector
from tests.support.servers import MemcachedProcess
from tests.support.statsd_daemon import StatsdDaemon

#: A registry the ``registry`` option of the prometheus exporter can name by path.
TEST_REGISTRY = CollectorRegistry()


class Recorder(MetricsCollector):
    """A collector for ``module:attr`` tests: remembers its options and its gets."""

    def __init__(self, label: str = "x", *, factor: int = 1) -> None:
        self.label = label
        self.factor = factor
        self.gets: list[tuple[str, bool]] = []
        self.closed = False
        RECORDERS.append(self)

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        self.gets.append((layer, hit))

    def close(self) -> None:
        self.closed = True


RECORDERS: list[Recorder] = []
RECORDER_INSTANCE = Recorder("instance")
NOT_A_COLLECTOR = 42


class HalfACollector:
    """Four of the seed's eight methods: a chain cannot report to it."""

    def record_get(self, layer: str, hit: bool, duration: float) -> None: ...

    def record_set(self, layer: str, success: bool, duration: float) -> None: ...

    def record_delete(self, layer: str, success: bool, duration: float) -> None: ...

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None: ...


MADE: list[Any] = []


def returns_a_string() -> str:
    return "not a collector"


def returns_a_closable_non_collector() -> Any:
    class Thing:
        closed = False

        def close(self) -> None:
            self.closed = True

    thing = Thing()
    MADE.append(thing)
    return thing


def raises_runtime_error(**options: Any) -> Any:
    raise RuntimeError("the backend library is broken")


# -- throwaway distributions ---------------------------------------------------------------


class Dists:
    """Writes throwaway distributions (a ``.dist-info`` with entry points, and modules)
    into a folder on ``sys.path``, as ``pip install`` would leave them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(self, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = self.root / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8"
        )
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            self.modules.append(module)
        importlib.invalidate_caches()


@pytest.fixture()
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dists]:
    monkeypatch.syspath_prepend(str(tmp_path))
    d = Dists(tmp_path)
    yield d
    for module in d.modules:
        sys.modules.pop(module, None)
    ex.reset_exporters()


def plugin_source(*names: str, fail: bool = False) -> str:
    adds = "\n".join(
        f"    registry.add({n!r}, Recorder, description='{n} exporter')" for n in names
    )
    raise_line = "    raise RuntimeError('hook exploded')" if fail else ""
    return (
        "from cachechain.exporters import hookimpl\n"
        "from tests.test_exporters import Recorder\n"
        "@hookimpl\n"
        "def cachechain_register_exporters(registry):\n"
        f"{adds}\n{raise_line}\n"
    )


def builtins_only() -> ExporterManager:
    return ExporterManager(entry_points=lambda: [])


# -- discovery -----------------------------------------------------------------------------


def test_importing_cachechain_imports_no_plugin_and_discovery_is_lazy() -> None:
    script = textwrap.dedent(
        """
        import sys
        import cachechain
        plugins = {"cachechain_statsd", "cachechain_hit_ratio"}
        assert not plugins & set(sys.modules), "import cachechain loaded a plugin"
        from cachechain.exporters import available_exporters, create_exporter
        assert "cachechain_statsd" not in sys.modules, "importing exporters loaded a plugin"
        names = [e.name for e in available_exporters()]
        assert "statsd" in names, names
        # Discovery imports the plugin module, not the statsd client library.
        assert "statsd" not in sys.modules
        create_exporter({"exporter": "statsd", "options": {"host": "127.0.0.1"}}).close()
        assert "statsd" in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_builtin_exporters_are_registered_through_the_hook() -> None:
    manager = builtins_only()
    report = manager.report()
    assert [e.name for e in report.exporters] == ["memory", "none", "prometheus"]
    assert all(e.builtin and e.distribution == "cachechain" for e in report.exporters)
    assert all(e.version for e in report.exporters)
    impls = manager.pm.hook.cachechain_register_exporters.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["cachechain"]
    assert (report.conflicts, report.failures) == ((), ())


def test_installed_plugins_are_found_through_their_entry_points() -> None:
    exporters = {e.name: e for e in ex.available_exporters()}
    statsd = exporters["statsd"]
    assert (statsd.distribution, statsd.plugin, statsd.builtin) == (
        "cachechain-statsd",
        "statsd",
        False,
    )
    assert statsd.version == importlib.metadata.version("cachechain-statsd")
    example = exporters["hit-ratio"]
    assert example.distribution == "cachechain-hit-ratio"
    assert ex.get_manager().report().failures == ()


def test_entry_points_are_read_once(dists: Dists) -> None:
    calls: list[int] = []

    def eps() -> list[Any]:
        calls.append(1)
        return []

    manager = ExporterManager(entry_points=eps)
    manager.report()
    manager.report()
    manager.get("memory")
    assert calls == [1]


def test_a_plugin_that_fails_to_import_is_named_in_a_warning_and_the_others_load(
    dists: Dists,
) -> None:
    dists.add(
        "broken-dist",
        {"broken": "broken_plugin"},
        {"broken_plugin": "import nonexistent_lib_xyz\n"},
    )
    dists.add("good-dist", {"good": "good_plugin"}, {"good_plugin": plugin_source("good")})
    manager = ExporterManager()
    with pytest.warns(PluginLoadWarning, match=r"plugin 'broken' \(broken-dist 1\.0\)") as caught:
        report = manager.report()
    assert "nonexistent_lib_xyz" in str(caught[0].message)
    names = [e.name for e in report.exporters]
    assert "good" in names and "statsd" in names and "memory" in names
    assert [(f.plugin, f.distribution, f.version) for f in report.failures] == [
        ("broken", "broken-dist", "1.0")
    ]
    assert report.failures[0].error.startswith("import failed: ModuleNotFoundError")
    # Asking for an unknown name mentions what failed to load.
    with pytest.raises(UnknownExporterError, match="Plugins that failed to load: plugin 'broken'"):
        manager.create("brokn")


def test_two_plugins_claiming_one_name_is_a_clear_error(
    dists: Dists, caplog: pytest.LogCaptureFixture
) -> None:
    dists.add("twin-a", {"a": "twin_a"}, {"twin_a": plugin_source("twin", "only-a")})
    dists.add("twin-b", {"b": "twin_b"}, {"twin_b": plugin_source("twin")})
    dists.add("rogue", {"rogue": "rogue_plugin"}, {"rogue_plugin": plugin_source("memory")})
    manager = ExporterManager()
    with caplog.at_level("WARNING", logger="cachechain.exporters"):
        report = manager.report()
    assert "exporter name 'twin' is registered by plugin 'a' (twin-a 1.0)" in caplog.text
    assert [c.name for c in report.conflicts] == ["memory", "twin"]
    twin = report.conflicts[1]
    assert "plugin 'a' (twin-a 1.0)" in twin.describe()
    assert "plugin 'b' (twin-b 1.0)" in twin.describe()
    with pytest.raises(ExporterConflictError, match=r"'twin' is registered by plugin 'a'") as err:
        manager.create("twin")
    assert "twin-b" in str(err.value) and "uninstall one" in str(err.value)
    with pytest.raises(ExporterConflictError, match="plugin 'cachechain'"):
        manager.create("memory")
    # The rest still works.
    assert isinstance(manager.create("only-a"), Recorder)
    assert isinstance(manager.create("none"), NoOpCollector)


def test_a_plugin_whose_hook_raises_registers_nothing(dists: Dists) -> None:
    dists.add("half", {"half": "half_plugin"}, {"half_plugin": plugin_source("half", fail=True)})
    manager = ExporterManager()
    with pytest.warns(PluginLoadWarning, match="registration failed: RuntimeError: hook exploded"):
        report = manager.report()
    assert "half" not in [e.name for e in report.exporters]
    assert not manager.pm.has_plugin("half")


def test_a_misspelt_hook_is_a_plugin_failure(dists: Dists) -> None:
    source = (
        "from cachechain.exporters import hookimpl\n"
        "@hookimpl\n"
        "def cachechain_register_exporter(registry):\n"
        "    pass\n"
    )
    dists.add("typo", {"typo": "typo_plugin"}, {"typo_plugin": source})
    with pytest.warns(PluginLoadWarning, match="typo"):
        report = ExporterManager().report()
    assert report.failures[0].plugin == "typo"
    assert "cachechain_register_exporter" in report.failures[0].error


def test_the_same_distribution_found_twice_loads_once() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    manager = ExporterManager(entry_points=lambda: eps + eps)
    report = manager.report()
    assert report.conflicts == () and report.failures == ()
    assert "statsd" in [e.name for e in report.exporters]


def test_two_distributions_with_one_entry_point_name_are_both_loaded(dists: Dists) -> None:
    dists.add("same-1", {"same": "same_one"}, {"same_one": plugin_source("one")})
    dists.add("same-2", {"same": "same_two"}, {"same_two": plugin_source("two")})
    report = ExporterManager().report()
    plugins = {e.name: e.plugin for e in report.exporters}
    assert {plugins["one"], plugins["two"]} == {"same", "same (same-2)"} or {
        plugins["one"],
        plugins["two"],
    } == {"same", "same (same-1)"}


def test_registry_add_refuses_bad_registrations() -> None:
    manager = builtins_only()

    class Plugin:
        def __init__(self, *adds: tuple[Any, Any]) -> None:
            self.adds = adds

        @hookimpl
        def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
            for name, factory in self.adds:
                registry.add(name, factory)

    with pytest.raises(ValueError, match="exporter name must be lower-case"):
        manager.register(Plugin(("Bad Name", Recorder)), "p1")
    with pytest.raises(ValueError, match="is not callable"):
        manager.register(Plugin(("fine", 3)), "p2")
    with pytest.raises(ValueError, match="registers exporter 'dup' twice"):
        manager.register(Plugin(("dup", Recorder), ("dup", Recorder)), "p3")
    assert [e.name for e in manager.report().exporters] == ["memory", "none", "prometheus"]
    plugin = Plugin(("mine", Recorder))
    assert manager.register(plugin, "p4") == "p4"
    with pytest.raises(ValueError, match="registered already"):
        manager.register(plugin, "p5")
    with pytest.raises(ValueError, match="registered already"):
        manager.register(Plugin(), "p4")
    assert isinstance(manager.create("mine"), Recorder)
    with pytest.raises(RuntimeError, match="called by the cachechain_register_exporters hook"):
        ExporterRegistry().add("x", Recorder)


def test_register_plugin_adds_to_the_shared_manager() -> None:
    class Plugin:
        @hookimpl
        def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
            registry.add("by-code", Recorder, description="first line\nsecond line")

    try:
        ex.register_plugin(Plugin(), "by-code-plugin")
        info = ex.get_manager().get("by-code")
        assert (info.description, info.distribution, info.version) == ("first line", None, None)
        assert isinstance(create_exporter("by-code"), Recorder)
    finally:
        ex.reset_exporters()
    assert "by-code" not in [e.name for e in ex.available_exporters()]


# -- create_exporter -----------------------------------------------------------------------


def test_names_mappings_and_lists_create_collectors() -> None:
    manager = builtins_only()
    assert isinstance(manager.create("memory"), MemoryCollector)
    assert isinstance(manager.create(" Memory "), MemoryCollector)
    assert type(manager.create("none")) is NoOpCollector
    assert isinstance(manager.create({"exporter": "memory"}), MemoryCollector)
    assert isinstance(manager.create({"exporter": "memory", "options": None}), MemoryCollector)
    fan = manager.create(["memory", {"exporter": "tests.test_exporters:Recorder"}])
    assert isinstance(fan, FanoutCollector)
    assert [type(c) for c in fan.collectors] == [MemoryCollector, Recorder]
    assert isinstance(manager.create(["none", "memory"]), MemoryCollector)
    assert type(manager.create(["none", "none"])) is NoOpCollector
    assert type(manager.create([])) is NoOpCollector
    mine = Recorder()
    assert manager.create(mine) is mine


def test_a_fanout_feeds_every_collector_through_a_chain() -> None:
    config = chain_config_from_mapping(
        {
            "layers": [{"type": "memory"}],
            "metrics": ["memory", {"exporter": "tests.test_exporters:Recorder"}],
        },
        environ={},
    )
    with Chain.from_config(config) as chain:
        chain.set("k", 1)
        chain.get("k")
        chain.get("absent")
    memory, recorder = config.metrics_collector.collectors
    assert memory.snapshot().layer_metrics["L1"].hits == 1
    assert ("L1", False) in recorder.gets


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (3, "metrics must be an exporter name, a mapping"),
        ({"exporter": "memory", "opts": {}}, r"metrics\.opts is not a metrics setting"),
        ({"options": {}}, r"metrics\.exporter must be an exporter name"),
        ({"exporter": ""}, r"metrics\.exporter must be an exporter name"),
        ({"exporter": "memory", "options": [1]}, r"metrics\.options must be a mapping"),
        ({"exporter": "memory", "options": {"a b": 1}}, r"metrics\.options keys must be"),
        (["memory", None], r"metrics\[1\] must be an exporter name"),
        (["memory", ["none"]], r"metrics\[1\] must be an exporter name"),
        (
            {"exporter": "memory", "options": {"size": 1}},
            r"metrics\.options\.size is not an option of exporter 'memory' "
            r"\(options: sample_hits\)",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_field(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        builtins_only().create(spec)


def test_a_module_attr_path_selects_a_custom_exporter_without_a_plugin() -> None:
    manager = builtins_only()
    made = manager.create(
        {"exporter": "tests.test_exporters:Recorder", "options": {"label": "a", "factor": 3}}
    )
    assert isinstance(made, Recorder) and (made.label, made.factor) == ("a", 3)
    assert manager.create("tests.test_exporters:RECORDER_INSTANCE") is RECORDER_INSTANCE
    cases = [
        (
            {"exporter": "tests.test_exporters:RECORDER_INSTANCE", "options": {"a": 1}},
            "takes no options",
        ),
        ("tests.test_exporters:NOT_A_COLLECTOR", "neither a collector nor a callable"),
        ("tests.test_exporters:Nope", "module 'tests.test_exporters' has no attribute 'Nope'"),
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("tests.test_exporters:", "must look like 'package.module:attribute'"),
        ("tests.test_exporters:returns_a_string", "returned 'not a collector', which is not"),
        (
            "tests.test_exporters:raises_runtime_error",
            "could not be created: RuntimeError: the backend",
        ),
        (
            {"exporter": "tests.test_exporters:Recorder", "options": {"colour": 1}},
            r"metrics\.options\.colour is not an option of exporter "
            r"'tests\.test_exporters:Recorder' \(options: label, factor\)",
        ),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            manager.create(spec)
    MADE.clear()
    with pytest.raises(ConfigError, match="is not a metrics collector"):
        manager.create("tests.test_exporters:returns_a_closable_non_collector")
    assert MADE[0].closed  # what was made is closed again


def test_a_collector_missing_a_seed_method_is_refused_naming_the_field() -> None:
    """The chain needs every one of the seed's eight methods: a factory returning less
    is a config error naming what is missing, not a TypeError when the chain is built
    (with the layers the config made left open)."""
    with pytest.raises(ConfigError, match=r"^metrics: exporter .*HalfACollector.* lacks "):
        builtins_only().create("tests.test_exporters:HalfACollector")
    with pytest.raises(ConfigError, match="record_queue_depth"):
        Chain.from_config(
            {"layers": [{"type": "memory"}], "metrics": "tests.test_exporters:HalfACollector"}
        )


def test_a_fanout_closes_what_it_made_when_a_later_entry_fails() -> None:
    manager = builtins_only()
    RECORDERS.clear()
    with pytest.raises(UnknownExporterError):
        manager.create(["tests.test_exporters:Recorder", "nope"])
    # The Recorder made for entry 0 was closed: nothing leaks a thread or a socket.
    assert len(RECORDERS) == 1 and RECORDERS[0].closed


def test_the_environment_variable_applies_where_the_config_names_no_exporter() -> None:
    manager = builtins_only()
    assert type(manager.create(None, environ={})) is NoOpCollector
    assert type(manager.create(None, environ={"CACHECHAIN_EXPORTER": " "})) is NoOpCollector
    assert isinstance(
        manager.create(None, environ={"CACHECHAIN_EXPORTER": "memory"}), MemoryCollector
    )
    assert type(manager.create(None, environ={"CACHECHAIN_EXPORTER": "none"})) is NoOpCollector
    fan = manager.create(
        None, environ={"CACHECHAIN_EXPORTER": "memory, tests.test_exporters:Recorder"}
    )
    assert isinstance(fan, FanoutCollector)
    # A config that names one wins.
    assert type(manager.create("none", environ={"CACHECHAIN_EXPORTER": "memory"})) is NoOpCollector
    with pytest.raises(UnknownExporterError, match=r"^CACHECHAIN_EXPORTER\.exporter: unknown"):
        manager.create(None, environ={"CACHECHAIN_EXPORTER": "nope"})


def test_the_shared_create_exporter_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHECHAIN_EXPORTER", "memory")
    assert isinstance(create_exporter(), MemoryCollector)
    monkeypatch.delenv("CACHECHAIN_EXPORTER")
    assert type(create_exporter()) is NoOpCollector


def test_an_unknown_name_lists_the_installed_exporters_and_the_package_to_install() -> None:
    manager = builtins_only()  # as if cachechain-statsd were not installed
    with pytest.raises(UnknownExporterError) as err:
        manager.create({"exporter": "statsd"})
    message = str(err.value)
    assert message.startswith("metrics.exporter: unknown metrics exporter 'statsd'")
    assert "installed exporters: memory, none, prometheus" in message
    assert "pip install cachechain-statsd" in message
    with pytest.raises(UnknownExporterError, match="installed exporters: memory") as err:
        manager.create("promethous")
    assert "pip install" not in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_options_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.options\.port must be an int in 1-65535"):
        create_exporter({"exporter": "statsd", "options": {"port": -1}})
    with pytest.raises(
        ConfigError,
        match=r"^metrics\.options\.hots is not an option of exporter 'statsd' "
        r"\(options: host, port",
    ):
        create_exporter({"exporter": "statsd", "options": {"hots": "x"}})
    with pytest.raises(
        ConfigError, match=r"^metrics\.options\.buckets: bucket bounds must be strictly ascending"
    ):
        create_exporter(
            {"exporter": "prometheus", "options": {"buckets": [3, 2, 1], "registry": None}}
        )
    with pytest.raises(ConfigError, match=r"^metrics\[1\]\.options\.flush_interval must be"):
        create_exporter(["memory", {"exporter": "statsd", "options": {"flush_interval": -1}}])


def test_the_prometheus_exporter_registers_where_its_option_says() -> None:
    manager = builtins_only()
    collector = manager.create(
        {
            "exporter": "prometheus",
            "options": {"registry": "tests.test_exporters:TEST_REGISTRY", "namespace": "cc_test"},
        }
    )
    view = collector.bind_chain("c", ["L1"])
    view.record_get("L1", True, 0.001)
    assert TEST_REGISTRY.get_sample_value("cc_test_hits_total", {"chain": "c", "layer": "L1"}) == 1
    with pytest.raises(ConfigError, match=r"metrics\.options\.registry: cannot import module"):
        manager.create({"exporter": "prometheus", "options": {"registry": "nomod_xyz:R"}})
    unregistered = manager.create(
        {"exporter": "prometheus", "options": {"registry": None, "buckets": [0.1, 1.0]}}
    )
    assert unregistered.namespace == "cache_chain"


def test_the_prometheus_exporter_says_what_to_install_without_prometheus_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cachechain.metrics._prometheus", None)
    with pytest.raises(ConfigError, match=r"pip install 'cachechain\[prometheus\]'"):
        builtins_only().create("prometheus")


def test_the_example_exporter_is_selected_by_name_and_by_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cachechain_hit_ratio import HitRatioExporter

    by_name = create_exporter({"exporter": "hit-ratio", "options": {"interval": 0}})
    by_path = create_exporter({"exporter": "cachechain_hit_ratio:HitRatioExporter"})
    assert isinstance(by_name, HitRatioExporter) and isinstance(by_path, HitRatioExporter)
    with Chain([MemoryLayer("L1")], metrics=by_name) as chain:
        chain.set("k", 1)
        for _ in range(3):
            chain.get("k")
        chain.get("absent")
    assert by_name.hit_ratios() == {"L1": 0.75}
    with caplog.at_level("INFO", logger="cachechain.hit_ratio"):
        assert by_name.log_now() == "L1=0.750"
    assert "cache hit ratios: L1=0.750" in caplog.text
    with pytest.raises(
        ConfigError,
        match=r"^metrics\.options\.level must be a logging level name, got 'LOUD'",
    ):
        create_exporter({"exporter": "hit-ratio", "options": {"level": "LOUD"}})


def test_the_example_exporter_logs_at_its_interval_on_an_injected_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cachechain_hit_ratio import HitRatioExporter

    now = [100.0]
    x = HitRatioExporter(interval=10, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="cachechain.hit_ratio"):
        x.record_get("L1", True, 0.0)
        assert "hit ratios" not in caplog.text
        now[0] = 110.0
        x.record_get("L1", False, 0.0)
        assert "cache hit ratios: L1=0.500" in caplog.text
    with pytest.raises(ValueError, match="interval"):
        HitRatioExporter(interval=-1)


# -- the CLI -------------------------------------------------------------------------------


def test_cachechain_plugins_lists_exporters_with_their_distribution(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["EXPORTER", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    version = importlib.metadata.version("cachechain-statsd")
    assert rows["statsd"][1:4] == ["cachechain-statsd", version, "statsd"]
    assert rows["memory"][1] == "cachechain"
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    statsd = next(e for e in data["exporters"] if e["name"] == "statsd")
    assert statsd == {
        "name": "statsd",
        "description": statsd["description"],
        "plugin": "statsd",
        "distribution": "cachechain-statsd",
        "version": version,
        "builtin": False,
    }
    assert data["conflicts"] == [] and data["failures"] == []


def test_cachechain_plugins_reports_broken_and_clashing_plugins(
    dists: Dists, capsys: pytest.CaptureFixture[str]
) -> None:
    dists.add(
        "broken-dist", {"broken": "broken_plugin"}, {"broken_plugin": "raise ImportError('boom')\n"}
    )
    dists.add("clash", {"clash": "clash_plugin"}, {"clash_plugin": plugin_source("statsd")})
    ex.reset_exporters()
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "broken plugin 'broken' (broken-dist 1.0): import failed: ImportError: boom" in out
    assert "conflict: exporter name 'statsd' is registered by" in out
    assert "\nstatsd " not in out  # an unusable name is not listed as an exporter
    ex.reset_exporters()
    assert main(["plugins", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["failures"][0]["distribution"] == "broken-dist"
    assert [c["name"] for c in data["conflicts"]] == ["statsd"]
    assert {c["distribution"] for c in data["conflicts"][0]["claims"]} == {
        "clash",
        "cachechain-statsd",
    }


# -- end to end: config -> entry point -> real StatsD daemon --------------------------------


@pytest.fixture(scope="module")
def statsd_daemon() -> Iterator[StatsdDaemon]:
    daemon = StatsdDaemon().start()
    yield daemon
    daemon.stop()


def test_a_chain_configured_with_statsd_by_name_reports_to_a_real_daemon(
    statsd_daemon: StatsdDaemon, memcached: MemcachedProcess
) -> None:
    daemon = statsd_daemon
    bad_before = daemon.bad_lines_seen()
    packets_before = daemon.packets_received()
    config = chain_config_from_mapping(
        {
            "name": "shop",
            # Exact counts, not coherence: under load a late poll set L1's entries aside
            # (14 of the 60 L1 hits missed, one backfill was skipped on 3.10 and 3.12).
            "coherence": False,
            "layers": [
                {"type": "memory", "name": "L1", "maxsize": 1000, "default_ttl": 60},
                {
                    "type": "memcached",
                    "name": "L2",
                    "servers": [memcached.address],
                    "key_prefix": "e2e:",
                    "timeout": 0.3,
                    "connect_timeout": 0.3,
                },
            ],
            "metrics": {
                "exporter": "statsd",
                "options": {
                    "host": "127.0.0.1",
                    "port": daemon.port,
                    "prefix": "e2e",
                    "timer_sample_rate": 1.0,
                },
            },
        },
        environ={},
    )
    exporter = config.metrics_collector
    assert type(exporter).__module__ == "cachechain_statsd.exporter"
    chain = Chain.from_config(config)
    for i in range(20):
        assert chain.set(f"k{i}", {"n": i}, ttl=60)
    for _ in range(3):
        for i in range(20):
            assert chain.get(f"k{i}") == {"n": i}
    l1 = chain.layers[0]
    for i in range(5):
        l1.delete(f"k{i}")  # now only in memcached
        assert chain.get(f"k{i}") == {"n": i}
    for i in range(7):
        assert chain.get(f"absent{i}") is None
    assert chain.delete("k19")
    chain.close()
    exporter.close(timeout=5)
    assert exporter.stats().send_errors == 0
    daemon.wait_for_packets(packets_before + exporter.stats().packets_sent)
    c = daemon.counters()
    assert c["e2e.shop.L1.hits"] == 60
    assert c["e2e.shop.L1.misses"] == 5 + 7
    assert c["e2e.shop.L2.hits"] == 5
    assert c["e2e.shop.L2.misses"] == 7
    assert c["e2e.shop.requests.hit.L1"] == 60
    assert c["e2e.shop.requests.hit.L2"] == 5
    assert c["e2e.shop.requests.miss.none"] == 7
    assert c["e2e.shop.L2.operations.set.success"] == 20
    assert c["e2e.shop.L1.operations.set.success"] == 20 + 5  # sets, then backfills
    assert c["e2e.shop.L2.operations.delete.success"] == 1
    timers = daemon.timers()
    assert len(timers["e2e.shop.L1.operation_duration.get"]) == 72
    assert len(timers["e2e.shop.L2.operation_duration.get"]) == 12
    gauges = daemon.gauges()
    assert gauges["e2e.shop.L2.circuit_state"] == 0
    assert gauges["e2e.shop.L2.queue_capacity"] == 1000
    assert daemon.bad_lines_seen() == bad_before, daemon.log_text()


def test_plugins_registered_by_code_and_entry_points_without_a_distribution() -> None:
    class Plugin:
        @hookimpl
        def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
            registry.add("shared", Recorder)

    loose = importlib.metadata.EntryPoint(
        name="loose", value="tests.test_exporters:LoosePlugin", group=ENTRY_POINT_GROUP
    )
    manager = ExporterManager(entry_points=lambda: [loose])
    manager.register(Plugin(), "by-code")
    report = manager.report()
    assert report.failures == ()
    (conflict,) = report.conflicts
    assert conflict.describe() == (
        "exporter name 'shared' is registered by plugin 'by-code' and plugin 'loose'"
    )
    assert {e.name: e.distribution for e in report.exporters}["loose-only"] is None


class LoosePlugin:
    """A plugin reached through an entry point that belongs to no distribution."""

    @staticmethod
    @hookimpl
    def cachechain_register_exporters(registry: ExporterRegistry) -> None:
        registry.add("shared", Recorder)
        registry.add("loose-only", Recorder)


def test_an_interrupt_while_importing_a_plugin_is_not_swallowed(dists: Dists) -> None:
    dists.add("ctrlc", {"ctrlc": "ctrlc_plugin"}, {"ctrlc_plugin": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        ExporterManager().report()


def test_a_failing_plugin_leaves_the_other_claims_of_a_name_in_place() -> None:
    manager = builtins_only()

    class Fails:
        @hookimpl
        def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
            registry.add("memory", Recorder)
            raise RuntimeError("late failure")

    with pytest.raises(RuntimeError, match="late failure"):
        manager.register(Fails(), "fails")
    assert manager.report().conflicts == ()
    assert isinstance(manager.create("memory"), MemoryCollector)


def test_the_prometheus_exporter_uses_the_default_registry_by_default() -> None:
    from prometheus_client import REGISTRY

    collector = builtins_only().create(
        {"exporter": "prometheus", "options": {"namespace": "cc_exporters_default"}}
    )
    collector.bind_chain("c", ["L1"]).record_get("L1", False, 0.0)
    labels = {"chain": "c", "layer": "L1"}
    assert REGISTRY.get_sample_value("cc_exporters_default_misses_total", labels) == 1
    collector.unregister(REGISTRY)
