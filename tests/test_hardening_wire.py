"""MemcachedLayer against a hostile server (issue 11, items 4-6): one deadline bounds a
whole call, a reply never makes the layer allocate more than a value may weigh, and
waiting on a socket works whatever its descriptor number.

The hostile server is :class:`tests.support.hostile.HostileServer`; item 6 runs against
the real memcached with more than 1,024 descriptors open in this process.
"""

from __future__ import annotations

import os
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachechain._codecs import JsonCodec, pack
from cachechain._errors import (
    CorruptValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
)
from cachechain.layers._base import MISSING
from cachechain.layers._memcached import MemcachedLayer
from cachechain.layers._memcached_keys import map_key
from tests.support.faultproxy import BacklogListener
from tests.support.hostile import (
    Drip,
    Flood,
    HostileServer,
    Reply,
    Request,
    Send,
    honest,
    value_reply,
)
from tests.support.servers import MemcachedProcess

#: Every layer call here must end within its timeout plus this much (a loaded machine
#: schedules late); the unbounded code took at least 0.8 s on each case.
TIMEOUT = 0.25
SLACK = 0.2

ENVELOPE = pack(JsonCodec(), "v" * 40, None)


@pytest.fixture()
def hostile() -> Iterator[HostileServer]:
    with HostileServer() as server:
        yield server
    assert server.errors == []


def layer_on(server: HostileServer, **kwargs: Any) -> MemcachedLayer:
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("connect_timeout", TIMEOUT)
    return MemcachedLayer("L2", server.address, **kwargs)


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """Run ``call``; return what it raised (None if nothing) and how long it took."""
    start = time.monotonic()
    try:
        call()
    except BaseException as exc:  # the caller asserts on it
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


# -- item 4: one deadline for the whole call -----------------------------------------


def _dripped(reply: bytes) -> Reply:
    """``reply`` one byte at a time, each byte well within the timeout, the whole reply
    taking at least 0.8 s: a per-read timeout never fires on it."""
    return Drip(reply, interval=min(0.2, max(0.05, 1.0 / len(reply))))


#: (operation, the reply dripped to each of its commands)
DRIPPED: dict[str, tuple[Callable[[MemcachedLayer], object], bytes]] = {
    "get": (lambda lay: lay.get("k"), value_reply(b"k", ENVELOPE)),
    "get_many": (lambda lay: lay.get_many(["k", "j"]), value_reply(b"k", ENVELOPE)),
    "set": (lambda lay: lay.set("k", "v"), b"STORED\r\n"),
    "set_many": (lambda lay: lay.set_many({"k": "v", "j": "w"}), b"STORED\r\n"),
    "delete": (lambda lay: lay.delete("k"), b"DELETED\r\n"),
    "delete_many": (lambda lay: lay.delete_many(["k", "j"]), b"DELETED\r\n"),
    "add": (lambda lay: lay.add("k", "v"), b"STORED\r\n"),
    "incr": (lambda lay: lay.incr("k"), b"12345\r\n"),
    "touch": (lambda lay: lay.touch("k", 10), b"VALUE k 2 2 7\r\n12\r\nEND\r\n"),
    "clear": (lambda lay: lay.clear(), b"OK\r\n"),
}


@pytest.mark.parametrize("operation", sorted(DRIPPED))
def test_a_dripping_server_cannot_hold_a_call_past_its_timeout(
    hostile: HostileServer, operation: str
) -> None:
    call, reply = DRIPPED[operation]
    lay = layer_on(hostile)
    hostile.answer(lambda request: _dripped(reply))
    error, elapsed = timed(lambda: call(lay))
    assert isinstance(error, LayerTimeoutError), error
    assert elapsed < TIMEOUT + SLACK
    assert lay._pool.first.idle == []  # never reused mid-reply
    hostile.answer(honest)
    assert lay.get("k") is MISSING  # a new connection, in step
    # A write that timed out kept its connection until the server answered it (the
    # rest of its drip, then the reaper's ``version``), and held its keys until then.
    keys = [map_key("k", ""), map_key("j", "")]
    lay._pool.fates.wait(keys, time.monotonic() + 5.0, "L2")
    assert lay._pool.fates.held == {}
    lay.close()


def test_a_reply_line_dripped_in_pieces_is_cut_at_the_deadline(hostile: HostileServer) -> None:
    lay = layer_on(hostile)
    hostile.answer(lambda request: Drip(b"x" * 4096, interval=0.05, chunk=16))
    error, elapsed = timed(lambda: lay.get("k"))
    assert isinstance(error, LayerTimeoutError), error
    assert elapsed < TIMEOUT + SLACK
    assert lay.stats().connections_open == 0
    lay.close()


def test_an_atomic_operation_keeps_one_deadline_over_its_rounds(
    hostile: HostileServer,
) -> None:
    """``touch`` of an envelope loops over gets/cas while other clients win; each reply
    comes in 0.1 s (within the timeout), and every cas loses: the loop must stop at the
    call's deadline, not run its 32 rounds."""
    live = pack(JsonCodec(), "v", time.time() + 600)
    replies = {
        b"gets": b"VALUE k 0 %d 77\r\n%s\r\nEND\r\n" % (len(live), live),
        b"cas": b"EXISTS\r\n",
    }

    def script(request: Request) -> Reply:
        reply = replies[request.command]
        return Drip(reply, interval=0.1, chunk=len(reply))

    lay = layer_on(hostile)
    hostile.answer(script)
    error, elapsed = timed(lambda: lay.touch("k", 10))
    assert isinstance(error, LayerTimeoutError), error
    assert elapsed < TIMEOUT + SLACK
    lay.close()


def test_connecting_counts_against_the_deadline() -> None:
    """A connect that never completes ends at the call's deadline, even when
    ``connect_timeout`` alone would allow more."""
    with BacklogListener() as listener:
        lay = MemcachedLayer("L2", listener.address, timeout=TIMEOUT, connect_timeout=5.0)
        error, elapsed = timed(lambda: lay.get("k"))
        assert isinstance(error, LayerTimeoutError), error
        assert elapsed < TIMEOUT + SLACK
        assert lay.stats().connections_open == 0
        lay.close()


def test_a_fast_reply_is_unaffected_by_an_earlier_slow_one(hostile: HostileServer) -> None:
    """After a call whose reply came in pieces, the pooled connection waits its full
    timeout again (a deadline shortened for one call is not left on the socket)."""
    lay = layer_on(hostile, timeout=1.0)
    # 10 pieces, 0.05 s apart: the call ends with about 0.5 s of its 1.0 s left.
    hostile.answer(lambda request: Drip(value_reply(b"k", ENVELOPE), interval=0.05, chunk=8))
    assert lay.get("k") == "v" * 40
    hostile.answer(lambda request: Drip(value_reply(b"k", ENVELOPE), interval=0.7, chunk=1000))
    assert lay.get("k") == "v" * 40  # waited 0.7 s for its one read: within 1.0 s
    assert lay.stats().connections_open == 1
    lay.close()


# -- item 5: memory is bounded by max_value_size, not by the server ------------------

HUGE = 256 * 1024 * 1024
FLOOD = 64 * 1024 * 1024
#: Far below what any of the replies below would make an unbounded reader hold.
PEAK_LIMIT = 16 * 1024 * 1024

FLOODS: dict[str, tuple[Callable[[MemcachedLayer], object], Reply]] = {
    "get: huge value header": (
        lambda lay: lay.get("k"),
        Flood(b"VALUE k 0 %d\r\n" % HUGE, FLOOD),
    ),
    "get_many: huge value header": (
        lambda lay: lay.get_many(["k", "j"]),
        Flood(b"VALUE k 0 %d\r\n" % HUGE, FLOOD),
    ),
    "touch: huge value header": (
        lambda lay: lay.touch("k", 10),
        Flood(b"VALUE k 0 %d 1\r\n" % HUGE, FLOOD),
    ),
    "get: line without CRLF": (lambda lay: lay.get("k"), Flood(b"", FLOOD)),
    "get_many: line without CRLF": (lambda lay: lay.get_many(["k"]), Flood(b"", FLOOD)),
    "set: line without CRLF": (lambda lay: lay.set("k", "v"), Flood(b"", FLOOD)),
    "incr: line without CRLF": (lambda lay: lay.incr("k"), Flood(b"", FLOOD)),
    "delete: line without CRLF": (lambda lay: lay.delete("k"), Flood(b"", FLOOD)),
}


@pytest.mark.parametrize("case", sorted(FLOODS))
def test_a_reply_larger_than_any_value_is_refused_without_holding_it(
    hostile: HostileServer, case: str
) -> None:
    call, reply = FLOODS[case]
    lay = layer_on(hostile, timeout=5.0)  # memory, not time, is what must stop these
    assert lay.get("warm") is MISSING  # the pooled connection is open: the usual case
    hostile.answer(lambda request: reply)
    tracemalloc.start()
    try:
        error, _ = timed(lambda: call(lay))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.0f} MiB held"
    # A corrupt reply: a counted failure of the call, not a closed connection.
    assert isinstance(error, LayerError), error
    assert not isinstance(error, (LayerUnavailableError, LayerTimeoutError)), error
    assert lay.stats().connections_open == 0
    lay.close()


def test_a_value_above_max_value_size_is_a_corrupt_reply(hostile: HostileServer) -> None:
    """The bound is the layer's own ``max_value_size`` (what it would ever store), not
    memcached's 1 GiB ceiling."""
    lay = layer_on(hostile, max_value_size=1000)
    hostile.answer(lambda request: Send(value_reply(b"k", b"x" * 1001)))
    for call in (lambda: lay.get("k"), lambda: lay.get_many(["k"]), lambda: lay.touch("k")):
        with pytest.raises(CorruptValueError, match="value size") as info:
            call()
        # A value this layer would never store (another application's, a bigger
        # max_value_size elsewhere): a corrupt read, not a sick server.
        assert info.value.trips_breaker is False
        assert info.value.layer == "L2"
        assert lay.stats().connections_open == 0
    assert lay.stats().corrupt_values == 3
    fits = pack(JsonCodec(), "x" * 900, None)
    hostile.answer(lambda request: Send(value_reply(b"k", fits)))
    assert lay.get("k") == "x" * 900
    assert lay.get_many(["k"]) == {"k": "x" * 900}
    lay.close()


def test_get_many_refuses_keys_it_did_not_ask_for_or_twice(hostile: HostileServer) -> None:
    """A server that sends more values than keys were asked for (another key, or one key
    again and again) would fill memory one small value at a time."""
    lay = layer_on(hostile)
    one = b"VALUE k 0 %d\r\n%s\r\n" % (len(ENVELOPE), ENVELOPE)
    for reply in (one * 2 + b"END\r\n", one.replace(b"VALUE k", b"VALUE z") + b"END\r\n"):
        hostile.answer(lambda request, reply=reply: Send(reply))  # type: ignore[misc]
        with pytest.raises(LayerError):
            lay.get_many(["k", "j"])
        assert lay.stats().connections_open == 0
    lay.close()


# -- item 6: no select() and its 1,024-descriptor ceiling ----------------------------

FD_TARGET = 1100


@pytest.fixture()
def many_descriptors() -> Iterator[None]:
    """More than 1,024 descriptors open in this process (pipes), so that every socket
    opened during the test has a descriptor number select() cannot take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_TARGET + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds: list[int] = []
    try:
        while not fds or fds[-1] < FD_TARGET:
            fds.extend(os.pipe())
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.memcached
@pytest.mark.usefixtures("many_descriptors")
def test_a_value_in_several_reads_past_descriptor_1024(memcached: MemcachedProcess) -> None:
    lay = MemcachedLayer("L2", memcached.address, timeout=2.0, connect_timeout=2.0)
    big = "x" * 300_000  # several reads of 64 KiB
    lay.set("big", big)
    (conn,) = lay._pool.nodes[0].idle
    assert conn.sock.fileno() > 1024
    assert lay.get("big") == big
    assert lay.get_many(["big"]) == {"big": big}
    assert lay.stats().connections_open == 1  # the same connection throughout
    assert lay._pool.nodes[0].idle == [conn]
    lay.close()


@pytest.mark.memcached
@pytest.mark.usefixtures("many_descriptors")
def test_a_command_never_retried_keeps_its_connection_past_descriptor_1024(
    memcached: MemcachedProcess,
) -> None:
    """``incr`` checks its pooled connection before sending (a server restart closes it);
    past descriptor 1,024 that check must not declare every connection dead."""
    lay = MemcachedLayer("L2", memcached.address, timeout=2.0, connect_timeout=2.0)
    assert lay.add("n", 1) is True
    (conn,) = lay._pool.nodes[0].idle
    assert conn.sock.fileno() > 1024
    sock = conn.sock
    assert lay.incr("n") == 2
    assert lay.incr("n") == 3
    assert lay._pool.nodes[0].idle == [conn]
    assert conn.sock is sock
    lay.close()
