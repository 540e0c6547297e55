"""Benchmark sections of issue 14: the Django backend against Django's own caches.

- ``django``: ``cache.get`` of a hit and ``cache.get_many`` of 20 hits through
  ``cachechain.contrib.django.CachechainCache`` (the default set-up: an in-process L1
  over memcached), Django's ``LocMemCache`` and Django's ``PyMemcacheCache`` on the
  same memcached, interleaved. Django is configured in this process (once) with the
  three aliases.
- ``gunicorn``: the example Django app under gunicorn (2 sync workers) with each
  backend (cachechain, and Django's ``PyMemcacheCache``: ``tests/support/gunicorn.py``),
  a view that reads one key and one that reads 20, driven over keep-alive HTTP;
  requests per second as ns per request, interleaved rounds.

Registered by ``run.py`` (``_sections_of_their_own``), which hands over its harness.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["sections"]


def sections(h: Any) -> dict[str, Callable[[Any], Any]]:
    """The sections, by id, bound to run.py's harness module ``h``."""
    return {
        "django": lambda ctx: bench_django(h, ctx),
        "gunicorn": lambda ctx: bench_gunicorn(h, ctx),
    }


def _configure(address: str) -> Any:
    """Django's settings with the three aliases (or None when Django is missing)."""
    import django
    from django.conf import settings

    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "chain": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "LOCATION": address,
            "OPTIONS": {"name": "bench-django"},
        },
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "pymemcache": {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": address,
        },
    }
    if not settings.configured:
        settings.configure(SECRET_KEY="bench", CACHES=caches, USE_TZ=True)
        django.setup()
    return settings


def bench_django(h: Any, ctx: Any) -> Any:
    sec = h.Section(
        "django",
        "15. Django: cache.get and get_many(20) hits, cachechain vs Django's backends",
        base="chain_get",
    )
    sec.notes.append(
        "cachechain's default set-up (L1 over memcached: a hit is served by L1), Django's "
        "LocMemCache (in-process) and PyMemcacheCache (every hit a memcached round trip, "
        "the same memcached). Values: a dict of 5 fields (pickled by Django's backends, "
        "signed-pickled by cachechain's memcached layer)."
    )
    django, why = h._optional("django")
    if django is None:
        sec.error = why
        return sec
    _configure(ctx.address)
    from django.core.cache import caches

    value = {"id": 42, "name": "Ada", "roles": ["admin"], "active": True, "score": 9.5}
    keys = [f"bench:{i}" for i in range(20)]
    names = ("chain", "locmem", "pymemcache")
    for name in names:
        cache = caches[name]
        cache.set_many(dict.fromkeys(keys, value), 600)
        sec.check(f"{name}: get hits", cache.get(keys[0]) == value)
        sec.check(f"{name}: get_many hits all 20", len(cache.get_many(keys)) == len(keys))
    contenders = []
    for name in names:
        cache = caches[name]

        def get_run(n: int, get: Any = cache.get) -> None:
            k = keys[0]
            for _ in repeat(None, n):
                get(k)

        def many_run(n: int, get_many: Any = cache.get_many) -> None:
            for _ in repeat(None, n):
                get_many(keys)

        contenders += [
            h.Contender(f"{name}_get", f"{name}: cache.get (hit)", get_run),
            h.Contender(f"{name}_many", f"{name}: cache.get_many(20) (hits)", many_run),
        ]
    h.run_section(sec, contenders, ctx.n(2_000), ctx.remote_rounds)
    sec.goals += [
        h.Goal("cachechain get vs LocMemCache get", "chain_get", "locmem_get", "info"),
        h.Goal("cachechain get vs PyMemcacheCache get", "chain_get", "pymemcache_get", "info"),
        h.Goal("cachechain get_many vs LocMemCache", "chain_many", "locmem_many", "info"),
        h.Goal("cachechain get_many vs PyMemcacheCache", "chain_many", "pymemcache_many", "info"),
    ]
    for name in names:
        caches[name].close()
    return sec


class _Http:
    """Sequential GETs over one keep-alive connection to a gunicorn server."""

    def __init__(self, port: int) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        reply = self.conn.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"GET {path}: {reply.status} {body[:200]!r}")
        return body

    def close(self) -> None:
        self.conn.close()


def bench_gunicorn(h: Any, ctx: Any) -> Any:
    import json
    import sys
    import urllib.parse
    from pathlib import Path

    sec = h.Section(
        "gunicorn",
        "16. A Django view under gunicorn (2 sync workers): cachechain vs PyMemcacheCache",
        base="stock_get",
    )
    sec.notes.append(
        "examples/django_app's /load/get (cache.get of one key) and /load/get_many (20 "
        "keys), every key a hit, over one keep-alive HTTP connection per server (so "
        "one worker serves a round: warm after the first); cachechain's default set-up "
        "(L1 over memcached) against Django's PyMemcacheCache on the same memcached."
    )
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from tests.support.gunicorn import GunicornProcess
    except ImportError as exc:  # gunicorn or the test support missing
        sec.error = f"gunicorn not available ({exc})"
        return sec
    keys = [f"bench:view:{i}" for i in range(20)]
    value = urllib.parse.quote(json.dumps({"id": 42, "name": "Ada", "roles": ["admin"]}))
    servers = {
        name: GunicornProcess("django", ctx.address, backend=backend, workers=2)
        for name, backend in (("chain", "cachechain"), ("stock", "stock"))
    }
    clients: dict[str, _Http] = {}
    try:
        for name, server in servers.items():
            server.start()
            client = clients[name] = _Http(server.port)
            for key in keys:
                client.conn.request("POST", f"/load/set?key={key}&value={value}&timeout=600")
                client.conn.getresponse().read()
            got = json.loads(client.get(f"/load/get_many?keys={','.join(keys)}"))
            sec.check(f"{name}: the view reads all 20 keys", len(got["values"]) == len(keys))
        one = f"/load/get?key={keys[0]}"
        many = f"/load/get_many?keys={','.join(keys)}"
        contenders = []
        for name, client in clients.items():

            def run(n: int, get: Any = client.get, path: str = one) -> None:
                for _ in repeat(None, n):
                    get(path)

            def run_many(n: int, get: Any = client.get, path: str = many) -> None:
                for _ in repeat(None, n):
                    get(path)

            contenders += [
                h.Contender(f"{name}_get", f"{name}: view of one key (hit)", run),
                h.Contender(f"{name}_many", f"{name}: view of get_many(20) (hits)", run_many),
            ]
        h.run_section(sec, contenders, ctx.n(200, minimum=20), ctx.rounds)
        sec.goals += [
            h.Goal("one key: cachechain vs PyMemcacheCache", "chain_get", "stock_get", "info"),
            h.Goal("20 keys: cachechain vs PyMemcacheCache", "chain_many", "stock_many", "info"),
        ]
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.stop()
            server.remove_log()
    return sec
