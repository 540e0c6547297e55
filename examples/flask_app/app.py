"""A minimal Flask app whose views cache through Flask-Caching with cachechain.

    pip install -e '.[flask]'
    memcached -l 127.0.0.1 -p 11211 &          # or set CACHECHAIN_MEMCACHED=HOST:PORT
    flask --app examples/flask_app/app.py run

``/`` is a whole view cached with ``@cache.cached``; ``/square/<n>`` calls a function
cached per argument with ``@cache.memoize``. Both are kept in an in-process layer (at
most 30 s) in front of memcached. Stop memcached and reload: the pages still answer.
"""

from __future__ import annotations

import os
import time

from flask import Flask
from flask_caching import Cache

app = Flask(__name__)
app.config.update(
    # Also keys the signed pickle codec of the memcached layer: every process that
    # shares the memcached must use the same SECRET_KEY.
    SECRET_KEY=os.environ.get("FLASK_SECRET_KEY", "example-only-change-me"),
    CACHE_TYPE="cachechain.contrib.flask.CachechainBackend",
    CACHE_DEFAULT_TIMEOUT=300,
    CACHE_KEY_PREFIX="example:",
    CACHE_OPTIONS={  # the mapping of cachechain.chain_config_from_mapping
        "name": "flask-example",
        "layers": [
            # Short max_ttl: another process's delete does not reach this memory.
            {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
            {
                "type": "memcached",
                "name": "L2",
                "servers": [os.environ.get("CACHECHAIN_MEMCACHED", "127.0.0.1:11211")],
                "timeout": 0.1,
                "connect_timeout": 0.1,
            },
        ],
    },
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


if __name__ == "__main__":
    app.run()
