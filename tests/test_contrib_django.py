"""cachechain.contrib.django: a real Django app (settings, URLconf, views, cache_page)
driven through Django's test Client, with a MemoryLayer L1 over the real memcached."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="cachechain-test-secret-key",
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}},
    )
    django.setup()

from django.core.cache import CacheKeyWarning, cache, caches
from django.core.cache.backends.base import InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client
from django.test.utils import override_settings
from django.urls import path
from django.views.decorators.cache import cache_page

from cachechain import Chain, UnconfirmedError
from cachechain._codecs import JsonCodec, SignedPickleCodec, TaggedJsonCodec
from cachechain._config import LeaseConfig
from cachechain._errors import ChainClosedError, ConfigError
from cachechain._namespace import NamespacedLayer
from cachechain._resilience import unwrapped
from cachechain.contrib import _EXITING, NO_EXPIRY_TTL, _close_open_chains
from cachechain.contrib.django import DEFAULT_L1, CachechainCache, chain_options, close_chains
from cachechain.layers._base import MISSING
from cachechain.layers._memcached import MemcachedLayer
from cachechain.testing import FakeClock
from tests.support.fakes import UNPICKLED, Boom, wait_for_waiters
from tests.support.processes import WAIT, reported, run_processes
from tests.support.servers import MemcachedProcess, just_stored
from tests.test_lease import settled

SECRET = "codec-secret-for-the-tests"
ROOT = Path(__file__).resolve().parents[1]

# -- the app: views, URLconf, a middleware that mutates every response -----------------

LOADS: collections.Counter[str] = collections.Counter()


def profile_view(request: HttpRequest, uid: int) -> HttpResponse:
    """Reads through django.core.cache.cache; 'loads' counts the slow path."""
    key = f"profile:{uid}"
    data = cache.get(key)
    if data is None:
        LOADS[key] += 1
        data = {"uid": uid, "loads": LOADS[key]}
        cache.set(key, data, 60)
    return JsonResponse(data)


@cache_page(60)
def page_view(request: HttpRequest) -> HttpResponse:
    LOADS["page"] += 1
    return HttpResponse(f"page rendered {LOADS['page']} times")


def hits_view(request: HttpRequest) -> HttpResponse:
    cache.add("hits", 0, None)
    return HttpResponse(str(cache.incr("hits")))


class StampMiddleware:
    """Appends to a header of every response, as real middleware mutates responses."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response["X-Stamp"] = response.get("X-Stamp", "") + "x"
        return response


urlpatterns = [
    path("profile/<int:uid>/", profile_view),
    path("page/", page_view),
    path("hits/", hits_view),
]


def caches_setting(address: str, *, codec: Any = None, **backend: Any) -> dict[str, dict[str, Any]]:
    l2: dict[str, Any] = {
        "type": "memcached",
        "name": "L2",
        "servers": [address],
        "key_prefix": "dj:",
        "timeout": 0.2,
        "connect_timeout": 0.2,
    }
    if codec is not None:
        l2["codec"] = codec
    return {
        "default": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "TIMEOUT": 120,
            "KEY_PREFIX": "t",
            "OPTIONS": {
                "name": "django-test",
                "layers": [{"type": "memory", "name": "L1", "maxsize": 1000}, l2],
            },
            **backend,
        }
    }


PICKLE_CODEC = {"type": "signed_pickle", "secret": SECRET}


@contextlib.contextmanager
def django_app(caches_config: dict[str, dict[str, Any]], **more: Any) -> Iterator[None]:
    """Serve this module's URLconf with ``caches_config``; close the chains after."""
    LOADS.clear()
    try:
        with override_settings(
            CACHES=caches_config,
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[f"{__name__}.StampMiddleware"],
            **more,
        ):
            yield
    finally:
        close_chains()


@pytest.fixture()
def app(memcached: MemcachedProcess) -> Iterator[MemcachedProcess]:
    """The app over the session memcached, with the signed pickle codec configured."""
    with django_app(caches_setting(memcached.address, codec=PICKLE_CODEC)):
        yield memcached


def forget_l1(b: CachechainCache) -> None:
    """This process forgets its in-process layer (memcached keeps what it has)."""
    b.chain.layers[0].clear()  # type: ignore[attr-defined]


def l2_codec(b: CachechainCache) -> Any:
    """The codec of the backend's memcached layer."""
    return unwrapped(b.chain.layers[1]).codec  # type: ignore[attr-defined]


def memcached_key(b: CachechainCache, key: str) -> bytes:
    """The key memcached holds ``key`` (a Django key) under: the layer's ``key_prefix``,
    the namespace generation, Django's made key."""
    layer: Any = b.chain.layers[1]
    while not isinstance(layer, NamespacedLayer):
        layer = layer.layer
    return f"dj:{layer.namespace.current()}{b.make_key(key)}".encode()


def l2_reader(address: str, codec: Any) -> Chain:
    """Another process's view of the memcached layer: a chain with no L1 (it shares the
    namespace generation stored there)."""
    return Chain(
        [
            MemcachedLayer(
                "L2", [address], key_prefix="dj:", codec=codec, timeout=0.2, connect_timeout=0.2
            )
        ]
    )


def backend() -> CachechainCache:
    b = caches["default"]
    assert isinstance(b, CachechainCache)
    return b


# -- the app, through Django's test Client ---------------------------------------------


@pytest.mark.memcached
def test_a_view_reads_through_l1_and_memcached(memcached: MemcachedProcess) -> None:
    with django_app(loose_setting(memcached.address)):  # L1 is checked
        settled(backend().chain)  # its first journal read would empty L1
        _a_view_reads_through_l1_and_memcached(memcached)


def _a_view_reads_through_l1_and_memcached(app: MemcachedProcess) -> None:
    client = Client()
    assert client.get("/profile/7/").json() == {"uid": 7, "loads": 1}
    assert client.get("/profile/7/").json() == {"uid": 7, "loads": 1}
    made = backend().make_key("profile:7")
    assert made == "t:1:profile:7"
    l1, l2 = backend().chain.layers
    assert l1.get(made) is not MISSING and l2.get(made) is not MISSING
    # Another process (no L1 of its own) reads the signed pickle from memcached.
    with l2_reader(app.address, SignedPickleCodec(SECRET)) as other:
        assert pickle.loads(other.get(made)) == {"uid": 7, "loads": 1}
    # This process forgets its L1: the value comes back from memcached, not the view.
    forget_l1(backend())
    assert l1.get(made) is MISSING
    assert client.get("/profile/7/").json() == {"uid": 7, "loads": 1}
    assert LOADS["profile:7"] == 1
    assert not backend().chain.closed  # Django's close() at request_finished kept it


@pytest.mark.memcached
def test_cache_page_serves_a_fresh_copy_of_the_cached_response(app: MemcachedProcess) -> None:
    client = Client()
    for _ in range(3):
        response = client.get("/page/")
        assert response.status_code == 200
        assert response.content == b"page rendered 1 times"
        # The middleware's change to the response served never reaches the cached one.
        assert response["X-Stamp"] == "x"
    forget_l1(backend())  # only memcached has the page now: a signed pickle of HttpResponse
    response = client.get("/page/")
    assert (response.content, response["X-Stamp"]) == (b"page rendered 1 times", "x")
    assert LOADS["page"] == 1


@pytest.mark.memcached
def test_add_and_incr_in_a_view(app: MemcachedProcess) -> None:
    client = Client()
    assert [client.get("/hits/").content for _ in range(3)] == [b"1", b"2", b"3"]
    with l2_reader(app.address, SignedPickleCodec(SECRET)) as other:
        assert other.get(backend().make_key("hits")) == 3  # ints are stored as they are


def loose_setting(address: str, codec: Any = PICKLE_CODEC) -> dict[str, dict[str, Any]]:
    """The caches setting with a coherence bound of 30 s, for the tests that check L1's
    contents or run with memcached down: a late poll on a loaded machine (or, with
    memcached down, the bound passing) empties L1 (docs/coherence.md), which a loaded
    machine's requests may outlast at the default 100 ms."""
    setting = caches_setting(address, codec=codec)
    setting["default"]["OPTIONS"]["coherence"] = {"bound": 30.0}
    return setting


@pytest.mark.memcached
def test_the_views_answer_while_memcached_is_down(own_memcached: MemcachedProcess) -> None:
    with django_app(loose_setting(own_memcached.address)):
        client = Client()
        assert client.get("/profile/1/").json()["loads"] == 1
        own_memcached.stop()
        backend().clear()
        started = time.perf_counter()
        for _ in range(3):
            for url in ("/profile/1/", "/page/"):
                assert client.get(url).status_code == 200
        assert time.perf_counter() - started < 3.0
        # L1 alone still caches: the profile was reloaded once, the page rendered once.
        assert client.get("/profile/1/").json()["loads"] == 2
        assert client.get("/page/").content == b"page rendered 1 times"
        # add and incr are memcached's own: while it is down no lock is granted and
        # nothing is counted; incr raises, not a ValueError (the key is not known to be
        # missing), as Django's PyMemcacheCache raises its client's error.
        assert backend().add("hits", 0, None) is False
        with pytest.raises(UnconfirmedError):
            backend().incr("hits")
        assert backend().set_many({"a": 1, "b": [2]}) == ["a", "b"]  # L2 did not take it
        assert backend().get_many(["a", "b"]) == {"a": 1, "b": [2]}  # L1 did
        # L2's writer holds repair deletes of "a" and "b" (it missed their values): the
        # chain does not read them there, and a delete of "a" is queued behind them
        # (not made yet: False).
        assert backend().delete("a") is False
        assert backend().get("a") is None and backend().get("b") == [2]
        assert backend().delete("zzz") is False  # not cached


@pytest.mark.memcached
def test_views_answer_when_memcached_was_never_up(own_memcached: MemcachedProcess) -> None:
    own_memcached.stop()
    with django_app(loose_setting(own_memcached.address)):
        client = Client()
        assert [client.get("/profile/2/").json()["loads"] for _ in range(2)] == [1, 1]
        assert client.get("/page/").status_code == 200


# -- one chain per configuration and process -------------------------------------------


@pytest.mark.memcached
def test_the_backends_of_every_thread_share_one_chain(app: MemcachedProcess) -> None:
    barrier = threading.Barrier(8)
    seen: list[tuple[CachechainCache, Chain]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        b = backend()
        b.set(f"from-{i}", i)
        with lock:
            seen.append((b, b.chain))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({id(b) for b, _ in seen}) == 8  # Django made one backend per thread
    assert {id(c) for _, c in seen} == {id(backend().chain)}
    assert backend().get_many([f"from-{i}" for i in range(8)]) == {f"from-{i}": i for i in range(8)}
    caches.close_all()  # what Django does at the end of each request
    assert not backend().chain.closed


@pytest.mark.memcached
def test_aliases_share_a_chain_per_configuration(memcached: MemcachedProcess) -> None:
    base = caches_setting(memcached.address, codec=PICKLE_CODEC)["default"]
    base["OPTIONS"]["coherence"] = False  # L1 is read: no poll may empty it meanwhile
    named = {**base["OPTIONS"], "name": "another-chain"}
    config = {
        "a": {**base},
        "b": {**base, "KEY_PREFIX": "other"},
        "c": {**base, "OPTIONS": named},
    }
    with django_app({"default": base, **config}):
        a, b, c = caches["a"], caches["b"], caches["c"]
        assert a.chain is b.chain is caches["default"].chain  # the same OPTIONS
        assert a.chain is not c.chain  # another name: a chain of its own
        a.set("k", "from a")
        assert b.get("k") is None  # KEY_PREFIX keeps their keys apart
        made = a.make_key("k")
        assert a.chain.layers[0].get(made) == "from a"
        assert c.chain.layers[0].get(made) is MISSING  # c has an L1 of its own...
        assert c.get("k") == "from a"  # ...over the same memcached


@pytest.mark.memcached
def test_location_is_the_memcached_of_the_default_set_up(memcached: MemcachedProcess) -> None:
    with django_app(
        {
            "default": {
                "BACKEND": "cachechain.contrib.django.CachechainCache",
                "LOCATION": memcached.address,
                "OPTIONS": {"name": "loc"},
            }
        }
    ):
        b = backend()
        l1, l2 = b.chain.layers
        assert (l1.name, l2.name, b.chain.name) == ("L1", "L2", "loc")
        assert l1.max_ttl == DEFAULT_L1["max_ttl"]  # type: ignore[attr-defined]
        assert unwrapped(l2).servers == (memcached.address,)  # type: ignore[attr-defined]
        assert isinstance(l2_codec(b), SignedPickleCodec)  # keyed by SECRET_KEY
        b.set("k", {"v": 1})
        forget_l1(b)
        assert b.get("k") == {"v": 1}  # from the memcached of LOCATION


def test_location_is_split_as_django_splits_it() -> None:
    def servers(location: Any) -> Any:
        return chain_options(location, {})["layers"][1]["servers"]

    assert servers("a:1") == ["a:1"]
    assert servers("a:1;b:2") == servers("a:1, b:2") == servers(["a:1", "b:2"]) == ["a:1", "b:2"]
    assert chain_options("a:1", {"name": "x"})["name"] == "x"
    with pytest.raises(ConfigError, match="LOCATION must be memcached servers"):
        chain_options(11211, {})


def test_location_beside_explicit_layers_or_neither_is_refused() -> None:
    layers = {"layers": [{"type": "memory"}]}
    with pytest.raises(ConfigError, match="LOCATION 'x:1' is not used when OPTIONS gives 'layers'"):
        CachechainCache("x:1", {"OPTIONS": layers})
    with pytest.raises(ConfigError, match=r"needs LOCATION \(the memcached servers"):
        CachechainCache("", {})
    with pytest.raises(ConfigError, match=r"needs LOCATION"):
        CachechainCache("", {"OPTIONS": {"name": "no-layers"}})


@pytest.mark.memcached
def test_close_chains_closes_them_and_backends_build_new_ones(app: MemcachedProcess) -> None:
    b = backend()
    b.set("k", "v")
    first = b.chain
    close_chains()
    assert first.closed
    assert b.chain is not first and not b.chain.closed
    assert b.get("k") == "v"  # from memcached; the new L1 started empty
    assert close_chains() == 0


def test_chains_are_closed_and_drained_at_interpreter_exit(memcached: MemcachedProcess) -> None:
    script = textwrap.dedent(
        f"""
        import atexit
        state = {{}}
        atexit.register(lambda: print("closed", state["chain"].closed))  # runs last

        import django
        from django.conf import settings
        settings.configure(SECRET_KEY="exit-test", CACHES={{"default": {{
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "OPTIONS": {{"layers": [
                {{"type": "memory"}},
                {{"type": "memcached", "servers": ["{memcached.address}"],
                  "key_prefix": "dj:", "write_behind": True}},
            ]}},
        }}}})
        django.setup()
        from django.core.cache import cache
        cache.set("queued", "written at exit")
        state["chain"] = cache.chain
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "closed True"
    assert "Traceback" not in done.stderr
    with l2_reader(memcached.address, SignedPickleCodec("exit-test")) as other:
        assert other.get(":1:queued") == "written at exit"


@pytest.mark.memcached
def test_a_forked_child_counts_on_memcached(app: MemcachedProcess) -> None:
    b = backend()
    b.set("n", 1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child exits without reporting coverage
        code = 3
        try:
            code = 0 if b.incr("n") == 2 else 1
            close_chains()  # publishes the change, as a living worker's poller would
        finally:
            os._exit(code)
    status = None
    gone = threading.Event()
    for _ in range(500):
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            break
        gone.wait(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on a lock held in the parent")
    assert os.waitstatus_to_exitcode(status) == 0
    assert b.chain.layers[1].get(b.make_key("n")) == 2  # the child's write reached memcached
    # The child published the key: this process's L1 drops its copy of 1 within the
    # coherence bound (100 ms; 5 s allowed for a loaded machine) and reads 2.
    seen = b.get("n")
    for _ in range(500):
        if seen == 2:
            break
        gone.wait(0.01)
        seen = b.get("n")
    assert seen == 2


def test_after_the_exit_hook_a_backend_builds_no_new_chain() -> None:
    b = CachechainCache("", {"OPTIONS": {"name": "exit", "layers": [{"type": "memory"}]}})
    try:
        _close_open_chains()
        assert b.chain.closed  # not rebuilt while the interpreter exits
        with pytest.raises(ChainClosedError):
            b.get("k")
    finally:
        _EXITING.clear()
        close_chains()
    assert not b.chain.closed  # after close_chains (and outside exit) it is rebuilt
    close_chains()


def test_get_or_set_takes_the_load_options_given_in_options() -> None:
    """``OPTIONS["load"]`` sets the chain's ``get_or_load`` defaults, so ``get_or_set``
    serves a fail-safe value when its callable fails (issue 12, item 5)."""
    options = {
        "name": "load-options",
        "layers": [{"type": "memory"}],
        "load": {"fail_safe": True, "fail_safe_max_age": 60, "lease": {"ttl": 5}},
    }
    b = CachechainCache("", {"OPTIONS": options})
    try:
        loads = b.chain._loads
        assert loads.lease == LeaseConfig(ttl=5)
        assert loads.policies.default is not None and loads.policies.default.fail_safe
        clock = FakeClock()
        unwrapped(b.chain.layers[0])._clock = clock  # type: ignore[attr-defined]
        assert b.get_or_set("k", lambda: "v1", 1) == "v1"
        clock.advance(2)
        assert b.get("k") is None  # expired for every ordinary read

        def database_down() -> str:
            raise ConnectionError("down")

        assert b.get_or_set("k", database_down, 1) == "v1"  # the fail-safe value
    finally:
        close_chains()


class UnhashableCodec(JsonCodec):
    """A codec object of a user's own that defines equality, so it is not hashable."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnhashableCodec)

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.memcached
def test_options_holding_objects_share_a_chain_by_identity(memcached: MemcachedProcess) -> None:
    codec = UnhashableCodec()
    options = caches_setting(memcached.address, codec=codec)["default"]
    first, second = CachechainCache("", options), CachechainCache("", options)
    assert first.chain is second.chain
    other = caches_setting(memcached.address, codec=UnhashableCodec())["default"]
    assert CachechainCache("", other).chain is not first.chain
    close_chains()


# -- configuration ---------------------------------------------------------------------


def memory_only(**backend: Any) -> dict[str, Any]:
    return {
        "BACKEND": "cachechain.contrib.django.CachechainCache",
        "OPTIONS": {"layers": [{"type": "memory", "name": "L1"}]},
        **backend,
    }


def test_bad_options_raise_config_errors_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="OPTIONS must be a cachechain chain mapping"):
        CachechainCache("", {"OPTIONS": ["memory"]})
    with pytest.raises(ConfigError, match=r"CACHES OPTIONS of a cachechain cache: layers\[0\]"):
        CachechainCache("", {"OPTIONS": {"layers": [{"type": "memory", "maxsize": 0}]}})
    with pytest.raises(ConfigError, match="a cachechain cache: layers must"):
        CachechainCache("", {"OPTIONS": {"layers": []}})


@pytest.mark.memcached
def test_memcached_gets_a_signed_pickle_codec_keyed_by_secret_key(
    memcached: MemcachedProcess,
) -> None:
    with django_app(caches_setting(memcached.address), SECRET_KEY="the-django-secret"):
        assert isinstance(l2_codec(backend()), SignedPickleCodec)
        backend().set("obj", {"a": (1, 2)})
        made = backend().make_key("obj")
        with l2_reader(memcached.address, SignedPickleCodec("the-django-secret")) as other:
            assert pickle.loads(other.get(made)) == {"a": (1, 2)}
        with l2_reader(memcached.address, SignedPickleCodec("another-secret")) as other:
            assert other.get(made, MISSING) is MISSING  # a bad signature is a miss
        with l2_reader(memcached.address, JsonCodec()) as other:
            assert other.get(made, MISSING) is MISSING


@pytest.mark.memcached
def test_a_codec_that_does_not_sign_never_has_memcached_bytes_unpickled(
    memcached: MemcachedProcess,
) -> None:
    """Found by review: with ``"codec": "tagged_json"`` the backend pickled values and
    unpickled every ``bytes`` value read back from memcached (code run in every worker
    by whoever can write there). It now uses tagged JSON unless every remote layer
    signs."""
    with django_app(caches_setting(memcached.address, codec="tagged_json")):
        b = backend()
        made = b.make_key("evil")
        with l2_reader(memcached.address, TaggedJsonCodec()) as other:
            assert other.set(made, pickle.dumps(Boom()), 60)
        assert b.get("evil") is None and b.get_many(["evil"]) == {}
        assert UNPICKLED == []
        b.set("obj", {"a": (1, 2)})
        forget_l1(b)
        assert b.get("obj") == {"a": (1, 2)}  # shared through memcached, as tagged JSON


def test_a_memcached_layer_without_codec_needs_secret_key(memcached: MemcachedProcess) -> None:
    options = caches_setting(memcached.address)["default"]
    with override_settings(SECRET_KEY=""), pytest.raises(ImproperlyConfigured, match="codec"):
        CachechainCache("", options)
    # With a codec of its own, SECRET_KEY is not needed.
    explicit = caches_setting(memcached.address, codec="json")["default"]
    with override_settings(SECRET_KEY=""):
        assert not CachechainCache("", explicit).chain.closed
    close_chains()


@pytest.mark.memcached
def test_an_explicit_json_codec_keeps_other_values_in_l1(memcached: MemcachedProcess) -> None:
    with django_app(loose_setting(memcached.address, codec="json")):  # L1 is checked
        b = backend()
        settled(b.chain)  # its first journal read would empty L1
        assert isinstance(l2_codec(b), JsonCodec)
        b.set("text", "plain")
        b.set("obj", {"a": 1})
        assert b.get("obj") == {"a": 1}
        with l2_reader(memcached.address, JsonCodec()) as other:
            assert other.get(b.make_key("text")) == "plain"
            assert other.get(b.make_key("obj"), MISSING) is MISSING


# -- the cache API ---------------------------------------------------------------------


@pytest.mark.memcached
def test_timeouts_follow_django(memcached: MemcachedProcess) -> None:
    setting = caches_setting(memcached.address, codec=PICKLE_CODEC)
    # Without coherence: L1's TTLs are read back, and its first read or a late poll
    # would empty L1 in between.
    setting["default"]["OPTIONS"]["coherence"] = False
    with django_app(setting):
        _timeouts_follow_django(backend())


def _timeouts_follow_django(b: CachechainCache) -> None:
    l1, l2 = b.chain.layers
    made = b.make_key("k")

    def ttls() -> tuple[float | None, float | None]:
        return l1.get_with_ttl(made)[1], l2.get_with_ttl(made)[1]

    b.set("k", 1)  # DEFAULT_TIMEOUT: the backend's TIMEOUT, 120 s
    assert all(110 < t <= 120 for t in ttls())  # type: ignore[operator]
    b.set("k", 1, 30)
    assert all(25 < t <= 30 for t in ttls())  # type: ignore[operator]
    b.set("k", 1, 2.5)
    assert all(0 < t <= 2.5 for t in ttls())  # type: ignore[operator]
    b.set("k", 1, None)  # never expires
    assert all(t > NO_EXPIRY_TTL - 60 for t in ttls())  # type: ignore[operator]
    b.set("k", 2, 0)  # not cached, and the old value is gone
    assert b.get("k") is None and l2.get(made) is MISSING
    b.set("k", 3, 30)
    b.set("k", 4, -5)
    assert b.get("k") is None and l2.get(made) is MISSING


def test_timeout_none_as_the_backend_default_never_expires() -> None:
    with django_app({"default": memory_only(TIMEOUT=None)}):
        b = backend()
        b.set("k", 1)
        ttl = b.chain.layers[0].get_with_ttl(b.make_key("k"))[1]
        assert ttl is not None and ttl > NO_EXPIRY_TTL - 60


@pytest.mark.memcached
def test_add_delete_has_key_and_touch(app: MemcachedProcess) -> None:
    b = backend()
    assert b.add("a", 1) is True
    assert b.add("a", 2) is False
    assert b.get("a") == 1
    assert b.add("zero", 1, 0) is True and b.has_key("zero") is False
    assert b.has_key("a") and "a" in b and "nope" not in b
    assert b.delete("a") is True
    assert b.delete("a") is False
    assert b.delete("never") is False
    b.set("none", None)
    assert b.has_key("none") and b.get("none", "default") is None
    assert b.touch("missing", 10) is False
    b.set("t", "v", 30)
    assert b.touch("t", 100) is True
    assert 90 < b.chain.layers[1].get_with_ttl(b.make_key("t"))[1] <= 100  # type: ignore[operator]
    assert b.touch("t", 0) is True and b.get("t") is None


@pytest.mark.memcached
def test_get_many_set_many_delete_many(app: MemcachedProcess) -> None:
    b = backend()
    assert b.set_many({"a": 1, "b": [2], 3: "int key"}) == []
    assert b.get_many(["a", "b", 3, "c"]) == {"a": 1, "b": [2], 3: "int key"}
    assert b.get_many(k for k in ("a", "c")) == {"a": 1}
    b.delete_many(["a", "b"])
    assert b.get_many(["a", "b", 3]) == {3: "int key"}
    assert b.set_many({3: "gone"}, timeout=0) == []
    assert b.get(3) is None


@pytest.mark.memcached
def test_incr_and_decr(app: MemcachedProcess) -> None:
    b = backend()
    with pytest.raises(ValueError, match="not found"):
        b.incr("n")
    b.set("n", 1)
    assert b.incr("n") == 2
    assert b.incr("n", 5) == 7
    b.set("digits", "5")  # a decimal str counts, as on Django's memcached backends
    assert b.incr("digits") == 6 and b.get("digits") == 6
    assert b.decr("n") == 6
    assert b.decr("n", 10) == -4
    assert b.get("n") == -4
    b.set("s", "text")
    with pytest.raises(TypeError):
        b.incr("s")


@pytest.mark.memcached
def test_incr_loses_no_update_between_threads(app: MemcachedProcess) -> None:
    backend().set("n", 0)
    barrier = threading.Barrier(8)

    def worker() -> None:
        b = backend()  # each thread its own backend, all on one chain
        barrier.wait()
        for _ in range(50):
            b.incr("n")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert backend().get("n") == 400


@pytest.mark.memcached
def test_versions_and_key_prefix(app: MemcachedProcess) -> None:
    b = backend()
    b.set("v", "one", version=2)
    assert b.get("v") is None
    assert b.get("v", version=2) == "one"
    assert b.incr_version("v", version=2) == 3
    assert b.get("v", version=2) is None and b.get("v", version=3) == "one"
    assert b.make_key("v", version=3) == "t:3:v"


@pytest.mark.memcached
def test_any_str_key_works_and_warns_as_djangos_generic_backends_do(
    app: MemcachedProcess,
) -> None:
    b = backend()
    for key in ("spaces and unicode é", "long" * 70, "control\x7f"):
        # The warning Django's local-memory cache gives: portability to memcached.
        with pytest.warns(CacheKeyWarning, match="will cause errors if used with memcached"):
            b.set(key, f"stored {key}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheKeyWarning)  # Django's way to silence it
            forget_l1(b)
            assert b.get(key) == f"stored {key}"  # from memcached, under a hashed key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.set("plain:key-é", 1)  # no warning for a key memcached takes
        assert b.get("plain:key-é") == 1


def test_a_key_function_returning_no_str_is_an_invalid_key() -> None:
    def key_function(key: str, prefix: str, version: int) -> int:
        return 42

    b = CachechainCache("", memory_only(KEY_FUNCTION=key_function))
    with pytest.raises(InvalidCacheKey, match="KEY_FUNCTION"):
        b.get("k")
    close_chains()


@pytest.mark.memcached
def test_values_are_copies(app: MemcachedProcess) -> None:
    b = backend()
    value = {"items": [1, 2]}
    b.set("v", value)
    value["items"].append(3)
    first = b.get("v")
    assert first == {"items": [1, 2]}
    first["items"].append(4)
    assert b.get("v") == {"items": [1, 2]}
    assert b.get("v") is not b.get("v")
    b.set("s", "a str")
    assert b.chain.get(b.make_key("s")) == "a str"  # plain values are not pickled
    assert isinstance(b.chain.get(b.make_key("v")), bytes)


def test_a_value_that_cannot_be_pickled_raises_pickling_error() -> None:
    b = CachechainCache("", memory_only())
    with pytest.raises(pickle.PicklingError, match="lock"):
        b.set("k", threading.Lock())
    assert b.get("k") is None
    close_chains()


def test_a_stored_value_that_cannot_be_unpickled_is_a_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = CachechainCache("", memory_only())
    made = b.make_key("k")
    b.chain.set(made, b"\x80\x05not a pickle", 60)
    with caplog.at_level("DEBUG", logger="cachechain.contrib"):
        assert b.get("k", "default") == "default"
        assert b.get_many(["k"]) == {}
    warnings_logged = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_logged) <= 1  # once per error type and process
    assert b.get_or_set("k", "fresh") == "fresh"
    assert b.get("k") == "fresh"
    b.chain.set(made, b"\x80\x05not a pickle", 60)
    assert b.get_or_set("k", "not cached", timeout=0) == "not cached"
    with pytest.raises(ValueError, match="not found"):
        b.incr("k")
    close_chains()


@pytest.mark.memcached
def test_get_or_set(app: MemcachedProcess) -> None:
    b = backend()
    assert b.get_or_set("g", lambda: {"x": 1}) == {"x": 1}
    assert b.get_or_set("g", lambda: {"x": 2}) == {"x": 1}
    assert b.get_or_set("plain", "value") == "value"
    assert b.get_or_set("none", None) is None and b.has_key("none")
    assert b.get_or_set("zero", lambda: "computed", timeout=0) == "computed"
    assert b.has_key("zero") is False
    b.set("zero", "cached")
    assert b.get_or_set("zero", lambda: "computed", timeout=0) == "cached"


@pytest.mark.memcached
def test_get_or_set_runs_the_default_once_for_eight_threads(app: MemcachedProcess) -> None:
    calls: list[int] = []
    release = threading.Event()

    def slow_default() -> str:
        calls.append(1)
        release.wait(10)
        return "loaded"

    results: list[Any] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        b = backend()
        barrier.wait()
        results.append(b.get_or_set("once", slow_default))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for_waiters(backend().chain, backend().make_key("once"), 7)
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert results == ["loaded"] * 8


@pytest.mark.memcached
def test_clear_empties_the_cache_for_every_process(app: MemcachedProcess) -> None:
    b = backend()
    b.set("k", "v")
    made = b.make_key("k")
    with l2_reader(app.address, SignedPickleCodec(SECRET)) as other:
        assert other.get(made) == "v"  # another process (no L1) reads it in memcached
    app.raw(b"set someone-else 0 0 1\r\nx\r\n")  # another application's key
    b.clear()
    assert b.chain.layers[0].get(made) is MISSING
    assert b.get("k") is None
    with l2_reader(app.address, SignedPickleCodec(SECRET)) as other:
        assert other.get(made, MISSING) is MISSING  # gone for every process
    assert app.raw(b"get someone-else\r\n").startswith(b"VALUE someone-else")


def test_clear_empties_a_memory_only_chain() -> None:
    b = CachechainCache("", memory_only())
    b.set("k", "v")
    b.clear()
    assert b.get("k") is None
    close_chains()


@pytest.mark.memcached
def test_the_async_variants(app: MemcachedProcess) -> None:
    b = backend()

    async def scenario() -> list[Any]:
        await b.aset("a", {"n": 1})
        assert await b.aset_many({"n": 1, "m": 2}) == []
        got = await b.aget_many(["a", "n", "x"])
        has = await b.ahas_key("a"), await b.ahas_key("x")
        loaded = await b.aget_or_set("g", lambda: "loaded")
        counted = await b.aincr("n", 4), await b.adecr("n")
        await b.adelete_many(["a", "n"])
        return [got, has, loaded, counted, await b.aget("a"), await b.aget("m")]

    assert asyncio.run(scenario()) == [
        {"a": {"n": 1}, "n": 1},
        (True, False),
        "loaded",
        (5, 4),
        None,
        2,
    ]


def test_the_example_project_serves_its_views(memcached: MemcachedProcess) -> None:
    script = textwrap.dedent(
        """
        import json
        import app
        from django.core.cache import cache
        from django.test import Client
        client = Client()
        first, second = client.get("/"), client.get("/")
        pages = [client.get("/page/").content.decode() for _ in range(2)]
        cache.chain.layers[0].clear()  # this process forgets L1: the next reads are memcached's
        third = client.get("/")
        print(json.dumps({
            "codes": [r.status_code for r in (first, second, third)],
            "same": first.json() == second.json() == third.json(),
            "pages": pages[0] == pages[1],
            "page_after_clear": client.get("/page/").content.decode() == pages[0],
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "examples" / "django_app",
        env={**os.environ, "PYTHONPATH": str(ROOT), "CACHECHAIN_MEMCACHED": memcached.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        '{"codes": [200, 200, 200], "same": true, "pages": true, "page_after_clear": true}'
    )


# -- atomic across processes (issue 10) ------------------------------------------------


def _django_worker(barrier: Any, results: Any, index: int, address: str, keys: int) -> None:
    """A worker process: its own settings, then add as a lock, incr and decr."""

    def work() -> tuple[list[int], list[int], int, int]:
        with override_settings(CACHES=caches_setting(address, codec=PICKLE_CODEC)):
            try:
                won = []
                for k in range(keys):
                    barrier.wait(WAIT)  # every worker asks for the same lock at once
                    if cache.add(f"lock:{k}", index, 30):
                        won.append(k)
                cache.add("hits", 0, None)  # one worker starts the counter
                barrier.wait(WAIT)
                seen = [cache.incr("hits") for _ in range(100)]
                barrier.wait(WAIT)
                counted = cache.get("hits")
                barrier.wait(WAIT)
                for _ in range(50):
                    cache.decr("hits", 3)  # 4 x 150 from 400: below 0
                barrier.wait(WAIT)
                return won, seen, counted, cache.get("hits")
            finally:
                close_chains()

    reported(results, index, work)


@pytest.mark.memcached
def test_add_incr_and_decr_are_atomic_across_worker_processes(memcached: MemcachedProcess) -> None:
    got = run_processes(_django_worker, 4, memcached.address, 10)
    winners = sorted(k for won, _, _, _ in got for k in won)
    assert winners == list(range(10))  # one winner per lock
    assert sorted(n for _, seen, _, _ in got for n in seen) == list(range(1, 401))
    assert [(counted, final) for _, _, counted, final in got] == [(400, -200)] * 4


@pytest.mark.memcached
def test_get_or_set_stores_with_add(app: MemcachedProcess) -> None:
    b = backend()
    made = b.make_key("g")
    with l2_reader(app.address, SignedPickleCodec(SECRET)) as other:

        def slow_default() -> str:
            assert other.add(made, "theirs", 60)  # another worker stores first
            return "mine"

        assert b.get_or_set("g", slow_default) == "theirs"  # the value that won
        assert b.get("g") == "theirs"
    b.clear()
    assert b.get_or_set("h", "mine") == "mine" and b.get("h") == "mine"


@pytest.mark.memcached
def test_a_counter_keeps_its_timeout_and_can_be_touched(app: MemcachedProcess) -> None:
    b = backend()
    b.set("n", 1, 100)
    mkey = memcached_key(b, "n")
    assert b.incr("n", 2) == 3 and b.decr("n", -2) == 5 and b.incr("n", -7) == -2
    assert app.ttl(mkey) in just_stored(100)
    assert b.touch("n", 50) is True
    assert app.ttl(mkey) in just_stored(50)
    assert b.get("n") == -2 and b.has_key("n")
    b.set("f", 1.5)
    assert b.incr("f") == 2.5  # not a counter: value + delta, as the local-memory cache
    with pytest.raises(TypeError):
        b.incr("n", 1.5)  # type: ignore[arg-type]


@pytest.mark.memcached
def test_get_or_set_on_a_miss_stores_in_memcached_and_the_next_get_backfills(
    memcached: MemcachedProcess,
) -> None:
    """``get_or_set`` adds its value: memcached keeps it, this process's L1 does not (an
    ``add`` keeps no local copy) until the next ``get`` backfills it."""
    with django_app(loose_setting(memcached.address)):
        b = backend()
        settled(b.chain)  # its first journal read would empty L1
        l1 = b.chain.layers[0]
        assert b.get_or_set("gos", lambda: {"v": 1}, 60) == {"v": 1}
        assert l1.get(b.make_key("gos")) is MISSING
        with l2_reader(memcached.address, SignedPickleCodec(SECRET)) as other:
            assert other.get(b.make_key("gos")) is not None
        assert b.get("gos") == {"v": 1}
        assert l1.get(b.make_key("gos")) is not MISSING
        assert b.get_or_set("gos", lambda: {"v": 2}, 60) == {"v": 1}
