"""TEST ENDPOINTS for ``scripts/load_workers.py``: they write, delete and CLEAR the cache.

Registered under ``/load/`` by ``app.py`` only when
``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1``; never enable them in production. Each answers
JSON with the ``pid`` of the worker that served it, so the load script can tell
gunicorn's workers apart.

Parameters are in the query string: ``key``; ``value``, a JSON value (``1``,
``"v1"``); ``timeout``, seconds (``CACHE_DEFAULT_TIMEOUT`` when absent). Reads are GET,
writes POST.

- ``GET  pid``: only the pid.
- ``POST add``, ``set``, ``delete``, ``clear``, ``incr``: ``cache.add(key, value,
  timeout)``, ``cache.set``, ``cache.delete``, ``cache.clear()``,
  ``cache.cache.inc(key)`` (the backend's: Flask-Caching's ``Cache`` has no ``inc``),
  and what each returned (``result``).
- ``GET  get``: ``cache.get(key)`` as ``value``.

Flask keeps its sessions in signed cookies, not in the cache: the load script's session
check is Django's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Blueprint, request
from flask_caching import Cache


def _reply(**fields: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), **fields}


def _value() -> Any:
    return json.loads(request.args["value"])


def _timeout() -> dict[str, float]:
    raw = request.args.get("timeout")
    return {} if raw is None else {"timeout": float(raw)}


def load_endpoints(cache: Cache) -> Blueprint:
    """The test endpoints over ``cache``, as a blueprint to register under ``/load``."""
    bp = Blueprint("load", __name__)

    @bp.get("/pid")
    def pid() -> dict[str, Any]:
        return _reply()

    @bp.post("/add")
    def add() -> dict[str, Any]:
        return _reply(result=cache.add(request.args["key"], _value(), **_timeout()))

    @bp.post("/set")
    def set_() -> dict[str, Any]:
        return _reply(result=cache.set(request.args["key"], _value(), **_timeout()))

    @bp.post("/delete")
    def delete() -> dict[str, Any]:
        return _reply(result=cache.delete(request.args["key"]))

    @bp.post("/clear")
    def clear() -> dict[str, Any]:
        return _reply(result=cache.clear())

    @bp.post("/incr")
    def incr() -> dict[str, Any]:
        return _reply(result=cache.cache.inc(request.args["key"]))  # Cache has no inc()

    @bp.get("/get")
    def get() -> dict[str, Any]:
        return _reply(value=cache.get(request.args["key"]))

    return bp
