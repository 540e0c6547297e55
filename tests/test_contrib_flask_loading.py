"""Flask-Caching's decorators through ``get_or_load`` (issue 12, item 5):
``cachechain.contrib.flask.Cache`` in place of ``flask_caching.Cache``, with real Flask
apps and the real memcached. Each app has its own chain (its own L1 and connections),
so two apps stand for two workers. Thread hand-offs use barriers and events; the L1
clock is injected where an entry must expire.
"""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import flask_caching
import pytest
from flask import Flask, Response, abort, request
from flask_caching import CachedResponse

from cachechain import ConfigError, InvalidValueError
from cachechain._resilience import unwrapped
from cachechain.contrib.flask import Cache, CachechainBackend
from cachechain.testing import FakeClock
from tests.support.fakes import wait_for_waiters
from tests.support.servers import MemcachedProcess
from tests.test_lease_get_or_load import asked

WAIT = 10.0


class Site:
    """A Flask app with ``Cache`` from cachechain over L1 (+ memcached when given)."""

    def __init__(self, name: str, address: str | None, prefix: str, **load: Any) -> None:
        layers: list[dict[str, Any]] = [{"type": "memory", "name": "L1"}]
        if address is not None:
            layers.append(
                {"type": "memcached", "name": "L2", "servers": [address], "key_prefix": prefix}
            )
        options: dict[str, Any] = {"name": name, "layers": layers, "coherence": False}
        if load:
            options["load"] = load
        self.app = Flask(name)
        self.app.config.update(
            SECRET_KEY="s",
            CACHE_TYPE="cachechain.contrib.flask.CachechainBackend",
            CACHE_OPTIONS=options,
        )
        self.cache = Cache(self.app)
        backend = self.app.extensions["cache"][self.cache]
        assert isinstance(backend, CachechainBackend)
        self.backend = backend
        self.calls: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        self.backend.close()


@pytest.fixture()
def sites(memcached: MemcachedProcess) -> Iterator[list[Site]]:
    made: list[Site] = []
    yield made
    for site in made:
        site.close()


def test_a_view_missed_by_16_threads_runs_once(sites: list[Site]) -> None:
    site = Site("threads", None, "")
    sites.append(site)
    entered, release = threading.Event(), threading.Event()

    @site.app.route("/slow")
    @site.cache.cached(timeout=60)
    def slow() -> str:
        site.calls["slow"] += 1
        entered.set()
        assert release.wait(WAIT)
        return "page"

    start = threading.Barrier(16)
    bodies: list[bytes] = []

    def request() -> None:
        client = site.app.test_client()
        start.wait(WAIT)
        bodies.append(client.get("/slow").data)

    threads = [threading.Thread(target=request) for _ in range(16)]
    for t in threads:
        t.start()
    assert entered.wait(WAIT)
    made = site.backend.chain._flight._calls
    key = next(iter(made))
    wait_for_waiters(site.backend.chain, key, 15)  # 15 joined the leader's load
    release.set()
    for t in threads:
        t.join(WAIT)
    assert bodies == [b"page"] * 16
    assert site.calls["slow"] == 1  # flask_caching.Cache: once per thread that missed
    assert site.app.test_client().get("/slow").data == b"page" and site.calls["slow"] == 1


def test_a_memoized_function_serves_its_fail_safe_value_when_it_fails(
    sites: list[Site],
) -> None:
    site = Site("fail-safe", None, "", fail_safe_max_age=60)
    sites.append(site)
    clock = FakeClock()
    unwrapped(site.backend.chain.layers[0])._clock = clock  # type: ignore[attr-defined]
    down = [False]

    @site.cache.memoize(1, fail_safe=True)
    def price(item: str) -> int:
        site.calls[item] += 1
        if down[0]:
            raise ConnectionError("the database is down")
        return 42

    with site.app.app_context():
        assert price("tea") == 42
        clock.advance(2)  # expired
        down[0] = True
        assert price("tea") == 42  # the previous value, not the error
        assert site.calls["tea"] == 2
        # Flask-Caching's attributes read and write through.
        with pytest.raises(ConnectionError):
            price.uncached("tea")  # the function itself
        price.cache_timeout = 5
        assert price.cache_timeout == 5 and price._inner.cache_timeout == 5


def test_a_response_filter_keeps_a_result_out_and_options_are_checked(
    sites: list[Site],
) -> None:
    site = Site("filter", None, "")
    sites.append(site)

    @site.app.route("/flaky")
    @site.cache.cached(timeout=60, response_filter=lambda rv: rv != "error")
    def flaky() -> str:
        site.calls["flaky"] += 1
        return "error" if site.calls["flaky"] == 1 else "fine"

    @site.app.route("/bad")
    @site.cache.cached(timeout=60, lease="yes")
    def bad() -> str:
        return "x"

    client = site.app.test_client()
    assert client.get("/flaky").data == b"error"  # not cached
    assert client.get("/flaky").data == b"fine"
    assert client.get("/flaky").data == b"fine" and site.calls["flaky"] == 2
    site.app.testing = True  # errors propagate to the test
    with pytest.raises(InvalidValueError, match="lease must be a bool"):
        client.get("/bad")


def test_another_process_waits_for_the_view_that_holds_the_lease(
    sites: list[Site], memcached: MemcachedProcess
) -> None:
    prefix = f"{uuid.uuid4().hex[:8]}:"
    # A minute's lease: memcached may end the default 2 s one a second after a won it,
    # before a loaded machine's b asked (b would then build the page too).
    held = {"lease": {"ttl": 60}}
    a = Site("worker-a", memcached.address, prefix, **held)
    b = Site("worker-b", memcached.address, prefix, **held)
    sites += [a, b]
    entered, release = threading.Event(), threading.Event()
    for site in (a, b):

        def report(site: Site = site) -> str:
            site.calls["report"] += 1
            if site is a:
                entered.set()
                assert release.wait(WAIT)
            return f"built by {site.app.name}"

        site.app.add_url_rule("/report", "report", site.cache.cached(timeout=60)(report))
    got: list[bytes] = []
    first = threading.Thread(target=lambda: got.append(a.app.test_client().get("/report").data))
    first.start()
    assert entered.wait(WAIT)  # a holds the lease and builds the page
    waits = asked(b.backend.chain)
    second = threading.Thread(target=lambda: got.append(b.app.test_client().get("/report").data))
    second.start()
    assert waits.wait(WAIT)  # b found the lease held
    release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert got == [b"built by worker-a"] * 2
    assert a.calls["report"] == 1 and b.calls["report"] == 0


def test_with_another_backend_the_decorators_are_flask_cachings() -> None:
    app = Flask("simple")
    app.config.update(CACHE_TYPE="SimpleCache")
    cache = Cache(app)
    assert isinstance(cache, flask_caching.Cache)
    calls: list[int] = []

    @app.route("/plain")
    @cache.cached(timeout=60)
    def plain() -> str:
        calls.append(1)
        return "plain"

    @app.route("/loading")
    @cache.cached(timeout=60, fail_safe=True)
    def loading() -> str:
        return "never"

    client = app.test_client()
    assert client.get("/plain").data == b"plain" and client.get("/plain").data == b"plain"
    assert calls == [1]
    app.testing = True
    with pytest.raises(ConfigError, match="need CACHE_TYPE"):
        client.get("/loading")


def test_methods_generators_and_none_behave_as_with_flask_caching(sites: list[Site]) -> None:
    """Found by running Flask-Caching's own decorator tests with this ``Cache``: a
    memoized method binds to its instance, a generator is joined before it is cached,
    and ``None`` is never served without ``cache_none`` (so it is not stored)."""
    site = Site("flask-rules", None, "")
    sites.append(site)
    cache = site.cache

    class Shop:
        def __init__(self, name: str) -> None:
            self.name = name

        @cache.memoize(60)
        def price(self, item: str) -> str:
            site.calls[f"{self.name} {item}"] += 1
            return f"{self.name}: {item}"

        def __repr__(self) -> str:
            return f"Shop({self.name!r})"

    @cache.memoize(60)
    def chunks() -> Any:
        site.calls["chunks"] += 1
        yield "a"
        yield "b"

    @cache.memoize(60)
    def nothing() -> None:
        site.calls["nothing"] += 1

    with site.app.app_context():
        tea = Shop("tea")
        assert tea.price("cup") == "tea: cup" == tea.price("cup")
        assert Shop("coffee").price("cup") == "coffee: cup"
        assert site.calls["tea cup"] == 1 and site.calls["coffee cup"] == 1
        cache.delete_memoized(Shop.price, tea, "cup")
        assert tea.price("cup") == "tea: cup" and site.calls["tea cup"] == 2
        assert chunks() == "ab" == chunks() and site.calls["chunks"] == 1
        assert nothing() is None and nothing() is None
        assert site.calls["nothing"] == 2


# -- found by review: Flask-Caching's own rules, kept --------------------------------


def _expiring(site: Site) -> FakeClock:
    """An injected clock for the site's in-process layer (its entries expire on it)."""
    clock = FakeClock()
    unwrapped(site.backend.chain.layers[0])._clock = clock  # type: ignore[attr-defined]
    return clock


def test_a_callback_that_reads_the_cache_does_not_take_the_views_key(
    sites: list[Site],
) -> None:
    """The last read before the call is Flask-Caching's own: a ``make_cache_key`` that
    reads the cache (a generation, as apps do) must not get the page stored under
    its key."""
    site = Site("callback", None, "")
    sites.append(site)
    cache = site.cache

    def key() -> str:
        return "page:%s" % (cache.get("generation") or 0)

    @site.app.route("/p")
    @cache.cached(timeout=60, make_cache_key=key)
    def page() -> str:
        return "the page"

    assert site.app.test_client().get("/p").data == b"the page"
    with site.app.app_context():
        assert cache.get("generation") is None
        assert cache.get("page:0") == "the page"


def test_a_timed_load_runs_the_view_in_the_requests_context(sites: list[Site]) -> None:
    """A load that a caller may stop waiting for runs on another thread: the view still
    sees its ``request`` (a copy of the request's context)."""
    site = Site("timed", None, "", fail_safe_max_age=60)
    sites.append(site)
    clock = _expiring(site)
    calls: list[str] = []

    @site.app.route("/h")
    @site.cache.cached(timeout=1, query_string=True, hard_timeout=5.0)
    def hard() -> str:
        return "hello " + request.args.get("n", "?")

    @site.app.route("/s")
    @site.cache.cached(timeout=1, fail_safe=True, soft_timeout=5.0)
    def soft() -> str:
        calls.append(request.path)
        return "page"

    client = site.app.test_client()
    reply = client.get("/h?n=1")
    assert reply.status_code == 200 and reply.data == b"hello 1"
    assert client.get("/s").data == b"page"
    clock.advance(2)  # expired: a fail-safe value exists, the reload is timed
    assert client.get("/s").data == b"page" and calls == ["/s", "/s"]


def test_an_http_error_or_none_is_no_failure_and_no_fail_safe_value(
    sites: list[Site],
) -> None:
    """An ``abort(404)`` and a ``None`` result are Flask-Caching's answers, not loader
    failures: fail-safe does not replace them with the previous value."""
    site = Site("answers", None, "", fail_safe=True, fail_safe_max_age=60)
    sites.append(site)
    clock = _expiring(site)
    state = {"gone": False}
    users = {1: "ann"}

    @site.app.route("/item")
    @site.cache.cached(timeout=1, response_filter=lambda r: getattr(r, "status_code", 200) == 200)
    def item() -> str:
        if state["gone"]:
            abort(404)
        return "item"

    @site.cache.memoize(1)
    def user(uid: int) -> str | None:
        return users.get(uid)

    client = site.app.test_client()
    assert client.get("/item").status_code == 200
    with site.app.app_context():
        assert user(1) == "ann"
    state["gone"] = True
    del users[1]
    clock.advance(2)
    assert client.get("/item").status_code == 404
    with site.app.app_context():
        assert user(1) is None  # not the previous "ann"


def test_a_cached_response_keeps_its_own_timeout(sites: list[Site]) -> None:
    site = Site("cached-response", None, "")
    sites.append(site)

    @site.app.route("/r")
    @site.cache.cached(timeout=300)
    def page() -> Any:
        return CachedResponse(Response("x"), timeout=1)

    assert site.app.test_client().get("/r").status_code == 200
    l1: Any = unwrapped(site.backend.chain.layers[0])
    [key] = [k for k in l1._entries if "/r" in k]
    ttl = l1.get_with_ttl(key)[1]
    assert ttl is not None and ttl <= 1.0


def test_eager_refresh_is_refused_on_the_decorators(sites: list[Site]) -> None:
    site = Site("eager", None, "")
    sites.append(site)
    with pytest.raises(InvalidValueError, match="eager_refresh is not available"):
        site.cache.cached(60, eager_refresh=0.8)
    with pytest.raises(InvalidValueError, match="eager_refresh is not available"):
        site.cache.memoize(60, eager_refresh=0.8)
