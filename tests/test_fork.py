"""Row 29: a process forks while other threads hold the chain's locks (gunicorn
--preload). The child must get working locks and no stale in-flight state."""

from __future__ import annotations

import os
import threading
import time

import pytest

from cachechain import Chain, MemoryLayer
from tests.support.fakes import FakeLayer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")


def _wait_child(pid: int, timeout: float) -> int:
    """The child's exit status, or -1 after killing it when it hangs (a deadlock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        threading.Event().wait(0.02)  # polling a process; there is nothing to wait on
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


def test_a_child_forked_while_every_lock_is_held_works() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    chain = Chain([l1, l2])
    coherence = chain.coherence
    assert coherence is not None
    l2.set(coherence.namespace.current() + "remote", "from-l2", 60)
    breaker = chain.breakers["L2"]
    holding, release = threading.Event(), threading.Event()
    journal = coherence.backplane
    locks = [
        chain._fence._lock,
        l1._lock,
        breaker._lock,
        chain._flight._lock,
        coherence.namespace._lock,
        journal._lock,  # type: ignore[attr-defined]
    ]

    def hold_every_lock() -> None:
        for lock in locks:
            lock.acquire()
        holding.set()
        release.wait(30)
        for lock in reversed(locks):
            lock.release()

    holder = threading.Thread(target=hold_every_lock)
    holder.start()
    assert holding.wait(10)
    chain._fence._active[hash("remote") & 63] += 1  # a parent thread was mid-mutation
    pid = os.fork()
    if pid == 0:  # the child: every call below would hang on an inherited lock
        code = 1
        try:
            chain.set("k", "child", 60)
            ok = chain.get("k") == "child"
            ok = ok and chain.get("remote") == "from-l2"
            ok = ok and l1.get("remote") == "from-l2"  # backfilled: the stripe is not busy
            ok = ok and chain.get_or_load("loaded", lambda: 7) == 7
            ok = ok and breaker.state.name == "CLOSED"
            ok = ok and chain.delete("k")
            code = 0 if ok else 1
        finally:
            os._exit(code)
    try:
        assert _wait_child(pid, 20) == 0
    finally:
        release.set()
        holder.join(10)
        chain._fence._active[hash("remote") & 63] -= 1
        chain.close()
