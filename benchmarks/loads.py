"""Benchmark sections of issue 12: the cost of fail-safe, loader timeouts, eager
refresh and the lease on ``get_or_load``'s L1 hit, each off and on.

Registered by ``run.py`` (``_sections_of_their_own``), which hands over its harness
module: the sections report like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["sections"]


def sections(h: Any) -> dict[str, Callable[[Any], Any]]:
    """The sections, by id, bound to run.py's harness module ``h``."""
    return {"loads_hit": lambda ctx: bench_loads_hit(h, ctx)}


def bench_loads_hit(h: Any, ctx: Any) -> Any:
    from cachechain import Chain, MemcachedLayer, MemoryLayer
    from cachechain._config import LoadConfig

    sec = h.Section(
        "loads_hit",
        "12. get_or_load L1 hit: fail-safe, timeouts, eager refresh, lease off vs on "
        "(metrics=None)",
        base="off",
    )
    sec.notes.append(
        "Each chain is L1 over memcached with the key in L1, stored by get_or_load itself "
        "(stamped where fail-safe or eager refresh is on), far from its refresh point: the "
        "hit path only. 'per call' passes fail_safe=True to a chain whose defaults are off "
        "(the policy comes from the chain's memory of resolved options). 'off' has the "
        "lease off too; 'lease' is the default LoadConfig (the lease on; it acts on misses). "
        "Coherence is off: it adds nothing to a hit, and its poller drops every L1 entry "
        "when it loses track (a loaded machine), which would turn these hits into misses."
    )
    key = "loads:user:42"
    configs: dict[str, LoadConfig] = {
        "off": LoadConfig(lease=False),
        "lease": LoadConfig(),
        "fail_safe": LoadConfig(fail_safe=True),
        "timeouts": LoadConfig(soft_timeout=0.1, hard_timeout=1.0),
        "eager": LoadConfig(eager_refresh=0.8),
        "all": LoadConfig(fail_safe=True, soft_timeout=0.1, hard_timeout=1.0, eager_refresh=0.8),
    }
    chains = {
        name: Chain(
            [MemoryLayer("L1"), MemcachedLayer("L2", ctx.address)], load=config, coherence=False
        )
        for name, config in configs.items()
    }
    loads = [0]

    def loader() -> Any:
        loads[0] += 1
        return h.VALUE

    try:
        # A key per chain: chains over one memcached share its values (a chain that
        # misses would take another's value, found by its lease, unstamped).
        keys = {name: f"{key}:{name}" for name in chains}
        for name, chain in chains.items():
            chain.delete(keys[name])  # another section may have left it in memcached
            chain.get_or_load(keys[name], loader, 300)
        stamped = {n: len(c.layers[0]._data[keys[n]]) == 4 for n, c in chains.items()}
        wanted = dict.fromkeys(chains, False) | {"fail_safe": True, "eager": True, "all": True}
        sec.check(
            "stamped entries exactly where fail-safe or eager refresh is on",
            stamped == wanted,
            str(stamped),
        )
        off = chains["off"]

        def per_call(n: int) -> None:
            g, k, ld = off.get_or_load, keys["off"], loader
            for _ in repeat(None, n):
                g(k, ld, 300, fail_safe=True)

        def hit(name: str) -> Callable[[int], None]:
            def run(n: int) -> None:
                g, k, ld = chains[name].get_or_load, keys[name], loader
                for _ in repeat(None, n):
                    g(k, ld, 300)

            return run

        contenders = [
            h.Contender("get", "Chain.get, L1 hit (reference)", h.loop(off.get, keys["off"])),
            h.Contender("off", "get_or_load hit, every feature off", hit("off")),
            h.Contender("lease", "get_or_load hit, lease on (default)", hit("lease")),
            h.Contender("fail_safe", "get_or_load hit, fail_safe on", hit("fail_safe")),
            h.Contender("timeouts", "get_or_load hit, soft+hard timeouts", hit("timeouts")),
            h.Contender("eager", "get_or_load hit, eager_refresh=0.8", hit("eager")),
            h.Contender("all", "get_or_load hit, all of them", hit("all")),
            h.Contender("per_call", "get_or_load hit, fail_safe=True per call", per_call),
        ]
        h.run_section(sec, contenders, ctx.n(20_000), ctx.rounds)
        sec.check("the loader ran only to fill the chains", loads[0] == len(chains), str(loads))
        sec.check(
            "no background load ran (no refresh was due)",
            all(c._loads.background.running == 0 for c in chains.values()),
        )
        sec.goals += [
            h.Goal("get_or_load hit, off, vs Chain.get", "off", "get", "info"),
            h.Goal("lease on <= 1.10x off", "lease", "off", "<=", 1.10),
            h.Goal("fail_safe on <= 1.10x off", "fail_safe", "off", "<=", 1.10),
            h.Goal("timeouts on <= 1.10x off", "timeouts", "off", "<=", 1.10),
            h.Goal("eager_refresh on <= 1.10x off", "eager", "off", "<=", 1.10),
            h.Goal("all on <= 1.10x off", "all", "off", "<=", 1.10),
            h.Goal("fail_safe per call <= 1.10x off", "per_call", "off", "<=", 1.10),
        ]
    finally:
        for chain in chains.values():
            chain.close()
    return sec
