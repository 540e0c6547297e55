"""Row 26: the chain against a simple model, sequentially and under threads."""

from __future__ import annotations

import random
import threading
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cachechain import MISSING, Chain, MemoryLayer
from tests.support.fakes import FakeClock, FakeLayer

KEYS = st.sampled_from(["a", "b", "c", "d"])
VALUES = st.integers(min_value=0, max_value=1000)


class ChainModel(RuleBasedStateMachine):
    """Every operation through a 3-layer chain agrees with a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.l1 = MemoryLayer("L1", maxsize=2, clock=self.clock)  # small: evictions too
        self.l2 = FakeLayer("L2", clock=self.clock)
        self.l3 = FakeLayer("L3", clock=self.clock)
        self.chain = Chain([self.l1, self.l2, self.l3], coherence=False)
        self.model: dict[str, int] = {}

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: int) -> None:
        assert self.chain.set(key, value, ttl=60)
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.chain.delete(key)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.chain.get(key, MISSING) == self.model.get(key, MISSING)

    @rule(keys=st.lists(KEYS, max_size=4))
    def get_many(self, keys: list[str]) -> None:
        expected = {k: self.model[k] for k in keys if k in self.model}
        assert self.chain.get_many(keys) == expected

    @rule(key=KEYS, value=VALUES)
    def get_or_load(self, key: str, value: int) -> None:
        got = self.chain.get_or_load(key, lambda: value, ttl=60)
        expected = self.model.setdefault(key, value)
        assert got == expected

    @rule(key=KEYS, value=VALUES)
    def lower_layer_only(self, key: str, value: int) -> None:
        """Another process wrote L3 directly (and the upper layers lack the key)."""
        self.l1.delete(key)
        self.l2.delete(key)
        self.l3.set(key, value, 60)
        self.model[key] = value

    @invariant()
    def writers_keep_up(self) -> None:
        assert self.chain.flush(5)

    def teardown(self) -> None:
        self.chain.close()


TestChainModel = ChainModel.TestCase
TestChainModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_threads_mixing_get_set_delete_on_few_keys_stay_consistent() -> None:
    """8 threads, 4 keys: every value read was written for that key; after a final
    delete no layer keeps the key, and after a final set every layer has it."""
    l1, l2, l3 = MemoryLayer("L1", maxsize=2), FakeLayer("L2"), FakeLayer("L3", local=True)
    chain = Chain([l1, l2, l3], coherence=False)
    keys = ["a", "b", "c", "d"]
    barrier = threading.Barrier(8)
    bad: list[Any] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rnd = random.Random(n)
        barrier.wait()
        try:
            for i in range(2000):
                key = rnd.choice(keys)
                op = rnd.random()
                if op < 0.5:
                    value = chain.get(key)
                    if value is not None and not value.startswith(key + ":"):
                        bad.append((key, value))
                elif op < 0.8:
                    chain.set(key, f"{key}:{n}:{i}", ttl=60)
                elif op < 0.95:
                    chain.delete(key)
                else:
                    found = chain.get_many(keys)
                    bad.extend((k, v) for k, v in found.items() if not v.startswith(k + ":"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and bad == []
    assert chain.flush(10)
    chain.delete_many(keys)
    assert chain.flush(10)
    for layer in (l1, l2, l3):
        assert layer.get_many(keys) == {}, layer.name
    final = {k: f"{k}:final" for k in keys}
    chain.set_many(final)
    assert l1.get_many(keys).items() <= final.items()  # L1 holds 2 entries
    for layer in (l2, l3):
        assert layer.get_many(keys) == final, layer.name
    assert chain.get_many(keys) == final
    chain.close()
