"""The declarative chain config: mapping (Django settings, TOML, JSON) -> ChainConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cachechain import Chain, MemoryLayer
from cachechain._codecs import JsonCodec, SignedPickleCodec
from cachechain._config import (
    BreakerConfig,
    ChainConfig,
    CoherenceConfig,
    LayerConfig,
    WriterConfig,
)
from cachechain._errors import ConfigError
from cachechain._settings import chain_config_from_file, chain_config_from_mapping
from cachechain.exporters import UnknownExporterError
from cachechain.layers._memcached import MemcachedLayer
from cachechain.metrics import NoOpCollector
from cachechain.metrics._memory import MemoryCollector
from tests.support.servers import MemcachedProcess

CLOSED: list[str] = []


class TrackedLayer(MemoryLayer):
    """A layer class named by path in configs; remembers being closed."""

    def __init__(self, name: str, *, colour: str = "red", maxsize: int = 10) -> None:
        super().__init__(name, maxsize=maxsize)
        self.colour = colour

    def close(self) -> None:
        CLOSED.append(self.name)
        super().close()


def build_layer(name: str, **options: Any) -> MemoryLayer:
    """A layer factory that accepts any option (``**options``)."""
    layer = MemoryLayer(name)
    layer.options = options  # type: ignore[attr-defined]
    return layer


NOT_CALLABLE = 3


def needs_size(name: str, *, size: int) -> MemoryLayer:
    """A layer factory with a required option."""
    return MemoryLayer(name, maxsize=size)


def not_a_layer(name: str) -> object:
    """A factory that returns something that is not a layer."""
    return object()


def parse(mapping: dict[str, Any], **env: str) -> ChainConfig:
    return chain_config_from_mapping(mapping, environ=env)


class ClosableCollector(MemoryCollector):
    """A collector that counts its ``close()`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


#: A collector instance named by path in configs ("tests.test_settings:SHARED").
SHARED = ClosableCollector()


def test_a_full_mapping_builds_the_chain_config(memcached: MemcachedProcess) -> None:
    config = parse(
        {
            "name": "web",
            "coherence": False,  # its first read or a late poll would empty L1: exact hits
            "layers": [
                {"type": "memory", "name": "L1", "maxsize": 500, "default_ttl": 30, "max_ttl": 60},
                {
                    "type": "memcached",
                    "name": "L2",
                    "servers": [memcached.address],
                    "key_prefix": "cfg:",
                    "timeout": 0.2,
                    "connect_timeout": 0.1,
                    "pool_size": 4,
                    "codec": "json",
                    "resilient": True,
                    "call_timeout": 0.25,
                    "write_behind": True,
                    "breaker": {"max_failures": 3, "reset_timeout": 0.5},
                    "writer": {"queue_size": 50, "max_wait": 0.01},
                },
            ],
            "breaker": {"max_failures": 7},
            "writer": {"queue_size": 2000, "workers": 2},
            "metrics": "memory",
        }
    )
    assert config.name == "web"
    assert config.breaker == BreakerConfig(max_failures=7)
    assert config.writer == WriterConfig(queue_size=2000, workers=2)
    assert isinstance(config.metrics_collector, MemoryCollector)
    l1, l2 = config.layers
    assert isinstance(l1, LayerConfig) and isinstance(l2, LayerConfig)
    assert isinstance(l1.layer, MemoryLayer)
    assert (l1.layer.name, l1.layer.default_ttl, l1.layer.max_ttl) == ("L1", 30.0, 60.0)
    assert l1.layer.stats().maxsize == 500
    assert (l1.resilient, l1.breaker, l1.timeout, l1.write_behind, l1.writer) == (
        None,
        None,
        None,
        False,
        None,
    )
    assert isinstance(l2.layer, MemcachedLayer)
    assert (l2.resilient, l2.timeout, l2.write_behind) == (True, 0.25, True)
    assert l2.breaker == BreakerConfig(max_failures=3, reset_timeout=0.5)
    assert l2.writer == WriterConfig(queue_size=50, max_wait=0.01)
    with Chain.from_config(config) as chain:
        assert chain.set("k", {"v": 1})
        assert chain.flush(5)
        assert chain.layers[1].get("k") == {"v": 1}
        assert chain.get("k") == {"v": 1}
    snapshot = config.metrics_collector.snapshot()
    assert snapshot.layer_metrics["L1"].hits == 1


def test_defaults_fill_in_what_is_not_given() -> None:
    config = parse({"layers": [{"type": "memory"}, {"type": "memory"}]})
    assert config.name == "default"
    assert [c.layer.name for c in config.layers] == ["L1", "L2"]
    assert config.breaker == BreakerConfig() and config.writer == WriterConfig()
    assert type(config.metrics_collector) is NoOpCollector


def test_the_environment_names_the_exporter_when_the_config_does_not() -> None:
    layers = [{"type": "memory"}]
    assert isinstance(
        parse({"layers": layers}, CACHECHAIN_EXPORTER="memory").metrics_collector, MemoryCollector
    )
    assert isinstance(
        parse({"layers": layers, "metrics": None}, CACHECHAIN_EXPORTER="memory").metrics_collector,
        MemoryCollector,
    )
    off = parse({"layers": layers, "metrics": "none"}, CACHECHAIN_EXPORTER="memory")
    assert type(off.metrics_collector) is NoOpCollector


def test_codecs_by_name_mapping_or_path() -> None:
    def codec_of(value: Any) -> Any:
        config = parse({"layers": [{"type": "memcached", "codec": value}]})
        return config.layers[0].layer._codec

    assert isinstance(codec_of("json"), JsonCodec)
    assert isinstance(codec_of({"type": "json"}), JsonCodec)
    assert isinstance(codec_of({"type": "signed_pickle", "secret": "s3cret"}), SignedPickleCodec)
    assert isinstance(codec_of("cachechain:JsonCodec"), JsonCodec)
    instance = JsonCodec()
    assert codec_of(instance) is instance


def test_a_layer_class_of_your_own_by_path() -> None:
    config = parse(
        {"layers": [{"type": "tests.test_settings:TrackedLayer", "name": "mine", "colour": "blue"}]}
    )
    layer = config.layers[0].layer
    assert isinstance(layer, TrackedLayer) and (layer.name, layer.colour) == ("mine", "blue")
    open_ended = parse({"layers": [{"type": "tests.test_settings:build_layer", "anything": 1}]})
    assert open_ended.layers[0].layer.options == {"anything": 1}


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ([], "a chain config must be a mapping"),
        ({"layers": [{"type": "memory"}], "nmae": "x"}, r"^nmae is not a chain setting"),
        ({"layers": [{"type": "memory"}], "name": ""}, r"^name must be a non-empty str"),
        ({}, r"^layers must be a list of layer mappings"),
        ({"layers": "memory"}, r"^layers must be a list of layer mappings"),
        ({"layers": []}, r"^layers must list at least one layer"),
        ({"layers": ["memory"]}, r"^layers\[0\] must be a mapping with a 'type'"),
        ({"layers": [{"name": "L1"}]}, r"^layers\[0\]\.type must be 'memory', 'memcached'"),
        (
            {"layers": [{"type": "redis"}]},
            r"^layers\[0\]\.type must be one of 'memory', 'memcached'",
        ),
        (
            {"layers": [{"type": "memory", "name": 3}]},
            r"^layers\[0\]\.name must be a non-empty str",
        ),
        (
            {"layers": [{"type": "memory"}, {"type": "memory", "name": "L1"}]},
            r"^layers\[1\]\.name 'L1' is used by layers\[0\] too",
        ),
        (
            {"layers": [{"type": "memory", "maxsize": 0}]},
            r"^layers\[0\]\.maxsize must be an int >= 1, got 0",
        ),
        (
            {"layers": [{"type": "memory"}, {"type": "memcached", "timeout": -1}]},
            r"^layers\[1\]\.timeout must be",
        ),
        (
            {"layers": [{"type": "memory", "default_ttl": "soon"}]},
            r"^layers\[0\]\.default_ttl must be a number of seconds",
        ),
        (
            {"layers": [{"type": "memory"}, {"type": "memcached", "tiemout": 1}]},
            r"^layers\[1\]\.tiemout is not a setting of a memcached layer \(settings: type, name, "
            r"resilient, breaker, call_timeout, write_behind, writer, servers, key_prefix",
        ),
        (
            {"layers": [{"type": "memory", "clock": "x"}]},
            r"^layers\[0\]\.clock is not a setting of a memory layer",
        ),
        (
            {"layers": [{"type": "memcached", "servers": 5}]},
            r"^layers\[0\]\.servers must be a str or a sequence",
        ),
        (
            {"layers": [{"type": "memory", "resilient": "yes"}]},
            r"^layers\[0\]\.resilient must be true, false or null",
        ),
        (
            {"layers": [{"type": "memory", "write_behind": None}]},
            r"^layers\[0\]\.write_behind must be true or false",
        ),
        (
            {"layers": [{"type": "memory", "call_timeout": 0}]},
            r"^layers\[0\]\.call_timeout must be a number of seconds > 0",
        ),
        (
            {"layers": [{"type": "memory", "call_timeout": True}]},
            r"^layers\[0\]\.call_timeout must be a number of seconds > 0",
        ),
        (
            {"layers": [{"type": "memory", "breaker": {"max_failures": 0}}]},
            r"^layers\[0\]\.breaker\.max_failures must be an int > 0",
        ),
        (
            {"layers": [{"type": "memory", "breaker": {"max_fails": 1}}]},
            r"^layers\[0\]\.breaker\.max_fails is not a breaker setting \(settings: max_failures",
        ),
        (
            {"layers": [{"type": "memory", "writer": 5}]},
            r"^layers\[0\]\.writer must be a mapping of writer settings",
        ),
        (
            {"layers": [{"type": "memory"}], "writer": {"queue_size": -1}},
            r"^writer\.queue_size must be an int > 0",
        ),
        (
            {"layers": [{"type": "memory"}], "breaker": {"failure_rate": 2}},
            r"^breaker\.failure_rate must be in \(0, 1\]",
        ),
        (
            {"layers": [{"type": "memcached", "codec": "yaml"}]},
            r"^layers\[0\]\.codec\.type must be 'json', 'tagged_json' or 'signed_pickle'",
        ),
        (
            {"layers": [{"type": "memcached", "codec": {"type": "json", "x": 1}}]},
            r"^layers\[0\]\.codec\.x is not a json codec setting",
        ),
        (
            {"layers": [{"type": "memcached", "codec": {"type": "signed_pickle"}}]},
            r"^layers\[0\]\.codec\.secret must be a non-empty str",
        ),
        (
            {"layers": [{"type": "memcached", "codec": "nomod_xyz:Codec"}]},
            r"^layers\[0\]\.codec: cannot import module 'nomod_xyz'",
        ),
        (
            {"layers": [{"type": "tests.test_settings:NOT_CALLABLE"}]},
            r"^layers\[0\]\.type: 'tests\.test_settings:NOT_CALLABLE' is not a class or callable",
        ),
        (
            {"layers": [{"type": "tests.test_settings:Missing"}]},
            r"^layers\[0\]\.type: module 'tests\.test_settings' has no attribute 'Missing'",
        ),
        (
            {"layers": [{"type": "tests.test_settings:build_layer", "name": ""}]},
            r"^layers\[0\]\.name must be a non-empty str",
        ),
        (
            {"layers": [{"type": "memory"}], "metrics": {"exporter": "nope"}},
            r"^metrics\.exporter: unknown metrics exporter 'nope'",
        ),
        (
            {
                "layers": [{"type": "memory"}],
                "metrics": {"exporter": "statsd", "options": {"port": 0}},
            },
            r"^metrics\.options\.port must be an int in 1-65535, got 0",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_field(mapping: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        chain_config_from_mapping(mapping, environ={})


def test_a_layer_class_that_refuses_its_options_is_reported_for_its_layer() -> None:
    with pytest.raises(ConfigError, match=r"^layers\[0\]\.maxsize must be an int >= 1"):
        parse({"layers": [{"type": "tests.test_settings:TrackedLayer", "maxsize": -5}]})
    with pytest.raises(ConfigError, match=r"^layers\[0\]: the .* layer refused its options"):
        parse({"layers": [{"type": "tests.test_settings:needs_size"}]})
    with pytest.raises(ConfigError, match=r"^layers\[0\]: layer must implement CacheLayer"):
        parse({"layers": [{"type": "tests.test_settings:not_a_layer"}]})


def test_layers_made_before_a_failure_are_closed_again() -> None:
    CLOSED.clear()
    with pytest.raises(UnknownExporterError):
        parse(
            {
                "layers": [
                    {"type": "tests.test_settings:TrackedLayer", "name": "a"},
                    {"type": "tests.test_settings:TrackedLayer", "name": "b"},
                ],
                "metrics": "nope",
            }
        )
    assert CLOSED == ["a", "b"]
    CLOSED.clear()
    with pytest.raises(ConfigError, match=r"^layers\[1\]\.maxsize"):
        parse(
            {
                "layers": [
                    {"type": "tests.test_settings:TrackedLayer", "name": "a"},
                    {"type": "tests.test_settings:TrackedLayer", "name": "b", "maxsize": 0},
                ]
            }
        )
    assert CLOSED == ["a"]


def test_a_metrics_value_of_the_wrong_shape_is_refused_before_any_layer_is_made() -> None:
    CLOSED.clear()
    with pytest.raises(ConfigError, match=r"^metrics\[1\] must be an exporter name"):
        parse(
            {
                "layers": [{"type": "tests.test_settings:TrackedLayer", "name": "a"}],
                "metrics": ["memory", None],
            }
        )
    assert CLOSED == []  # nothing was made, so nothing needed closing


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BreakerConfig(window=0), r"^breaker\.window must be an int > 0, got 0"),
        (
            lambda: BreakerConfig(reset_timeout=float("inf")),
            r"^breaker\.reset_timeout must be a finite number of seconds > 0",
        ),
        (
            lambda: BreakerConfig(failure_rate=0.5, min_calls=30),
            r"^breaker\.min_calls \(30\) must not exceed breaker\.window \(20\)",
        ),
        (
            lambda: WriterConfig(retry_delay=1.0, max_retry_delay=0.5),
            r"^writer\.max_retry_delay must be >= writer\.retry_delay",
        ),
        (lambda: WriterConfig(max_wait=-1), r"^writer\.max_wait must be a finite number"),
        (
            lambda: LayerConfig(MemoryLayer("L1"), timeout=0),
            r"^layer\.timeout must be a finite number of seconds > 0 or None, got 0",
        ),
    ],
)
def test_the_config_dataclasses_check_their_values(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_config_objects_are_accepted_where_a_python_config_holds_them() -> None:
    breaker = BreakerConfig(max_failures=2)
    config = parse({"layers": [{"type": "memory", "breaker": breaker}], "writer": WriterConfig()})
    assert config.layers[0].breaker is breaker


def test_a_collector_the_config_hands_over_is_not_closed_with_the_chain() -> None:
    """A collector object (or a "module:attr" naming one) may serve other chains: only
    a collector the config creates belongs to the chain and is closed with it."""
    mine = ClosableCollector()
    for spec in (mine, [mine, "memory"], "tests.test_settings:SHARED", {"exporter": "none"}):
        config = parse({"layers": [{"type": "memory"}], "metrics": spec})
        Chain.from_config(config).close()
    with pytest.raises(UnknownExporterError):  # what a failing list made is closed, not mine
        parse({"layers": [{"type": "memory"}], "metrics": [mine, "no-such-exporter"]})
    assert mine.closed == 0 and SHARED.closed == 0
    config = parse({"layers": [{"type": "memory"}], "metrics": "tests.test_settings:SHARED"})
    assert config.owns_collector is False
    made = parse(
        {"layers": [{"type": "memory"}], "metrics": "tests.test_settings:ClosableCollector"}
    )
    assert made.owns_collector is True
    Chain.from_config(made).close()
    assert made.metrics_collector.closed == 1


def test_json_and_toml_files(tmp_path: Path) -> None:
    json_file = tmp_path / "cache.json"
    json_file.write_text(
        json.dumps(
            {"name": "j", "layers": [{"type": "memory", "maxsize": 5}], "metrics": "memory"}
        ),
        encoding="utf-8",
    )
    config = chain_config_from_file(json_file, environ={})
    assert config.name == "j" and isinstance(config.metrics_collector, MemoryCollector)

    toml_file = tmp_path / "settings.toml"
    toml_file.write_text(
        """
        [cachechain]
        name = "t"

        [[cachechain.layers]]
        type = "memory"
        name = "L1"
        default_ttl = 30

        [[cachechain.layers]]
        type = "memcached"
        name = "L2"
        servers = ["127.0.0.1:11211"]
        timeout = 0.1

        [cachechain.layers.breaker]
        max_failures = 3

        [cachechain.metrics]
        exporter = "none"
        """,
        encoding="utf-8",
    )
    config = chain_config_from_file(str(toml_file), environ={})
    assert config.name == "t"
    assert [c.layer.name for c in config.layers] == ["L1", "L2"]
    assert config.layers[1].breaker == BreakerConfig(max_failures=3)

    bad = tmp_path / "bad.toml"
    bad.write_text("layers = [", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid \.toml"):
        chain_config_from_file(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid \.json"):
        chain_config_from_file(bad_json)
    top_level = tmp_path / "top.toml"
    top_level.write_text('[[layers]]\ntype = "memory"\n', encoding="utf-8")
    assert len(chain_config_from_file(top_level, environ={}).layers) == 1


def test_coherence_is_a_bool_or_its_fields() -> None:
    base: dict[str, Any] = {"layers": [{"type": "memory"}]}
    assert chain_config_from_mapping(base).coherence == CoherenceConfig()
    off = chain_config_from_mapping({**base, "coherence": False}).coherence
    assert off == CoherenceConfig(enabled=False, namespace=False)
    tuned = chain_config_from_mapping({**base, "coherence": {"bound": 0.5, "slots": 64}})
    assert tuned.coherence == CoherenceConfig(bound=0.5, slots=64)
    with pytest.raises(ConfigError, match=r"^coherence\.interval \(0\.04\) must be below"):
        chain_config_from_mapping({**base, "coherence": {"bound": 0.01}})
    with pytest.raises(ConfigError, match=r"^coherence must be a mapping"):
        chain_config_from_mapping({**base, "coherence": "yes"})
    with pytest.raises(ConfigError, match=r"^coherence\.boundd is not a coherence setting"):
        chain_config_from_mapping({**base, "coherence": {"boundd": 1}})
