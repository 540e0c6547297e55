"""The public surface: one import path per name, old paths deprecated for one release."""

from __future__ import annotations

import importlib
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
