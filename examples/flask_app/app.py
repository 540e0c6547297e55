"""A minimal Flask app whose views cache through Flask-Caching with cachechain.

    pip install -e '.[flask]'
    memcached -l 127.0.0.1 -p 11211 &          # or set CACHECHAIN_MEMCACHED=HOST:PORT
    flask --app examples/flask_app/app.py run

``/`` is a whole view cached with ``@cache.cached``; ``/square/<n>`` calls a function
cached per argument with ``@cache.memoize``. Both are kept in an in-process layer (at
most 30 s) in front of memcached. Stop memcached and reload: the pages still answer.

Under gunicorn (many processes over one memcached), from the repository root::

    gunicorn --chdir examples/flask_app --workers 4 wsgi:application

Each worker's in-process layer drops what another worker changed (a set, a delete, a
``clear()``) within 100 ms: cachechain's coherence, on by default. Settings read from the
environment for ``scripts/load_workers.py``, which drives this app under gunicorn:
``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1`` registers its test endpoints under ``/load/``
(they write and clear the cache: never in production, see ``load_views.py``);
``CACHECHAIN_EXAMPLE_BACKEND=stock`` swaps cachechain for Flask-Caching's own
``MemcachedCache`` (over a pooled pymemcache client), for comparison;
``CACHECHAIN_EXAMPLE_MEMCACHED_TIMEOUT`` (seconds, default 0.1) bounds each memcached
call.

``/healthz`` answers the chain's health as JSON (``Chain.health()``; 503 while a layer is
unhealthy). ``CACHECHAIN_EXAMPLE_METRICS=1`` turns on Prometheus metrics and serves them
at ``/metrics``: from prometheus-client's default registry in one process, or from every
worker's files when ``PROMETHEUS_MULTIPROC_DIR`` is set (an empty directory, created
before gunicorn starts; see docs/metrics.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from flask import Flask, Response
from flask_caching import Cache

MEMCACHED = os.environ.get("CACHECHAIN_MEMCACHED", "127.0.0.1:11211")
# Seconds a memcached call may take before it counts as failed.
MEMCACHED_TIMEOUT = float(os.environ.get("CACHECHAIN_EXAMPLE_MEMCACHED_TIMEOUT", "0.1"))
LOAD_ENDPOINTS = os.environ.get("CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS") == "1"
BACKEND = os.environ.get("CACHECHAIN_EXAMPLE_BACKEND", "cachechain")
METRICS = os.environ.get("CACHECHAIN_EXAMPLE_METRICS") == "1"

CACHECHAIN: dict[str, Any] = {
    "CACHE_TYPE": "cachechain.contrib.flask.CachechainBackend",
    "CACHE_OPTIONS": {  # the mapping of cachechain.chain_config_from_mapping
        "name": "flask-example",
        "layers": [
            # max_ttl caps what a worker keeps in memory; what another worker changes
            # is dropped from it within 100 ms (coherence, on by default).
            {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
            {
                "type": "memcached",
                "name": "L2",
                "servers": [MEMCACHED],
                "timeout": MEMCACHED_TIMEOUT,
                "connect_timeout": MEMCACHED_TIMEOUT,
            },
        ],
    },
}


if METRICS:  # prometheus-client's default registry, or multiprocess files
    CACHECHAIN["CACHE_OPTIONS"]["metrics"] = "prometheus"


def stock_config() -> dict[str, Any]:
    """Flask-Caching's own memcached backend, only to compare (``scripts/load_workers.py
    --backend stock``): cachelib's ``MemcachedCache`` over a thread-safe pymemcache
    client (pylibmc and python-memcached are not dependencies of this project)."""
    from pymemcache.client.base import PooledClient
    from pymemcache.serde import pickle_serde

    host, _, port = MEMCACHED.rpartition(":")
    client = PooledClient((host, int(port)), serde=pickle_serde, default_noreply=False)
    return {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": client}


if BACKEND not in ("cachechain", "stock"):
    raise SystemExit(f"CACHECHAIN_EXAMPLE_BACKEND must be cachechain or stock, got {BACKEND!r}")

# The app's errors and cachechain's warnings on stderr (gunicorn's error log).
logging.basicConfig(format="[%(levelname)s] %(name)s: %(message)s", level=logging.WARNING)

app = Flask(__name__)
app.config.update(
    # Also keys the signed pickle codec of the memcached layer: every process that
    # shares the memcached must use the same SECRET_KEY.
    SECRET_KEY=os.environ.get("FLASK_SECRET_KEY", "example-only-change-me"),
    CACHE_DEFAULT_TIMEOUT=300,
    CACHE_KEY_PREFIX="example:",
    **(CACHECHAIN if BACKEND == "cachechain" else stock_config()),
)
cache = Cache(app)


@app.route("/")
@cache.cached(timeout=60)
def index() -> dict[str, object]:
    return {"rendered_at": time.time(), "pid": os.getpid()}


@cache.memoize(timeout=60)
def square(n: int) -> int:
    time.sleep(0.2)  # stands for an expensive computation
    return n * n


@app.route("/square/<int:n>")
def show_square(n: int) -> str:
    return f"{n} squared is {square(n)}"


if BACKEND == "cachechain":

    @app.route("/healthz")
    def healthz() -> Response:
        """The chain's health as JSON: 200 when every layer is healthy, else 503 (the
        chain still answers then: an unhealthy layer is skipped as a miss)."""
        backend: Any = cache.cache  # cachechain.contrib.flask.CachechainBackend
        health = backend.chain.health()
        return Response(
            json.dumps(health.as_dict()),
            status=200 if health.healthy else 503,
            content_type="application/json",
        )


if METRICS:

    @app.route("/metrics")
    def metrics_view() -> Response:
        """Prometheus metrics: every worker's (multiprocess mode) or this process's."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        from cachechain import multiprocess_registry

        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        registry = multiprocess_registry() if multiprocess else REGISTRY
        # content_type, not mimetype: Flask appends "; charset=utf-8" to a mimetype, and
        # CONTENT_TYPE_LATEST already ends with it.
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


if LOAD_ENDPOINTS:
    from load_views import load_endpoints

    app.register_blueprint(load_endpoints(cache), url_prefix="/load")

if __name__ == "__main__":
    app.run()
