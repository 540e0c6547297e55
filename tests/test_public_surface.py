"""The public surface: one import path per name, old paths deprecated for one release."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import cachechain

PUBLIC = [
    "cachechain",
    "cachechain.layers",
    "cachechain.metrics",
    "cachechain.exporters",
    "cachechain.testing",
]

# Old module paths (before 0.2) and a name each of them exported.
OLD_PATHS = [
    ("cachechain.chain", "Chain"),
    ("cachechain.breaker", "CircuitBreaker"),
    ("cachechain.resilience", "ResilientLayer"),
    ("cachechain.writer", "AsyncWriter"),
    ("cachechain.singleflight", "LoadTimeoutError"),
    ("cachechain.config", "ChainConfig"),
    ("cachechain.errors", "ConfigError"),
    ("cachechain.codecs", "SignedPickleCodec"),
    ("cachechain.settings", "chain_config_from_mapping"),
    ("cachechain.demo", "run_demo"),
    ("cachechain.cli", "main"),
    ("cachechain.layers.base", "BaseLayer"),
    ("cachechain.layers.memory", "MemoryLayer"),
    ("cachechain.layers.memcached", "MemcachedLayer"),
    ("cachechain.metrics.base", "MetricsCollector"),
    ("cachechain.metrics.fanout", "FanoutCollector"),
    ("cachechain.metrics.memory", "MemoryCollector"),
    ("cachechain.metrics.prometheus", "PrometheusCollector"),
    ("cachechain.metrics.types", "MetricsSnapshot"),
    ("cachechain", "AsyncWriter"),
    ("cachechain", "ResilientLayer"),
    ("cachechain", "State"),
    ("cachechain", "BaseLayer"),
    ("cachechain.layers", "MemoryLayer"),
    ("cachechain.layers", "MISSING"),
    ("cachechain.metrics", "MemoryCollector"),
    ("cachechain.exporters", "get_manager"),
    ("cachechain.exporters", "ExporterManager"),
]


def test_every_public_name_has_one_import_path_and_a_docstring() -> None:
    seen: dict[str, str] = {}
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            assert name not in seen, f"{name} is exported by {seen.get(name)} and {module_name}"
            seen[name] = module_name
            if callable(obj) and not isinstance(obj, type(cachechain.MISSING)):
                assert obj.__doc__, f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize(("old", "name"), OLD_PATHS)
def test_old_import_paths_work_with_a_deprecation_warning(old: str, name: str) -> None:
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=r"deprecated since cachechain 0\.2"):
        value = getattr(module, name)
    assert value is not None


def test_the_renamed_circuit_state_is_the_old_state() -> None:
    with pytest.warns(DeprecationWarning, match="from cachechain as CircuitState"):
        old = importlib.import_module("cachechain.breaker").State
    assert old is cachechain.CircuitState


def test_an_unknown_old_name_is_an_attribute_error() -> None:
    module = importlib.import_module("cachechain.chain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError):
            module.NoSuchName  # noqa: B018
    with pytest.raises(AttributeError):
        cachechain.NoSuchName  # noqa: B018


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )


def test_old_dotted_paths_work_after_a_bare_import() -> None:
    # 0.1 imported its submodules with the package: cachechain.errors.X worked.
    r = _python(
        "import cachechain\n"
        "try:\n"
        "    raise cachechain.errors.ChainClosedError('x')\n"
        "except cachechain.errors.ChainClosedError:\n"
        "    pass\n"
        "cachechain.config.LayerConfig; cachechain.writer.AsyncWriter\n"
        "import cachechain.layers, cachechain.metrics\n"
        "cachechain.layers.memory.MemoryLayer; cachechain.metrics.base.MetricsCollector\n"
    )
    assert r.returncode == 0, r.stderr[-400:]


@pytest.mark.parametrize(
    "name",
    ["exporter_report", "ENV_VAR", "PROJECT_NAME", "KNOWN_EXPORTER_PACKAGES", "ExporterSpecs"],
)
def test_every_01_exporters_name_still_resolves(name: str) -> None:
    import cachechain.exporters as ex

    with pytest.warns(DeprecationWarning, match="cachechain.exporters"):
        value = getattr(ex, name)
    assert value is not None
    if name == "exporter_report":
        assert value().exporters


def test_star_import_needs_no_prometheus_client() -> None:
    r = _python("import sys\nsys.modules['prometheus_client'] = None\nfrom cachechain import *\n")
    assert r.returncode == 0, r.stderr[-400:]
