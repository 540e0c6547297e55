"""TEST ENDPOINTS for ``scripts/load_workers.py``: they write, delete and CLEAR the cache.

Mounted under ``/load/`` by ``app.py`` only when ``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1``;
never enable them in production. Each answers JSON with the ``pid`` of the worker
that served it, so the load script can tell gunicorn's workers apart.

Parameters are in the query string: ``key``; ``value``, a JSON value (``1``,
``"v1"``); ``timeout``, seconds (Django's default timeout when absent). Reads are GET,
writes POST (no CSRF middleware in this app).

- ``GET  pid``: only the pid.
- ``POST add``, ``set``, ``delete``, ``clear``, ``incr``: ``cache.add(key, value,
  timeout)``... and what it returned (``result``); ``incr`` of a key the cache does
  not have answers 409 with the error (Django raises ``ValueError``).
- ``GET  get``: ``cache.get(key)`` as ``value``.
- ``GET  get_many?keys=a,b,c``: ``cache.get_many(keys)`` as ``values`` (the benchmark's
  view of many keys).
- Sessions (cache-backed, ``SESSION_ENGINE`` of ``app.py``), as ``django.contrib.auth``
  handles them but with no user table: ``POST login?user=NAME`` (a new session key,
  ``user`` and an empty ``cart``), ``POST cart?item=ITEM`` (appends to the cart when
  logged in), ``GET whoami`` (``user`` and ``cart``, ``null`` when logged out),
  ``POST logout`` (the session is flushed).
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.cache import cache
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET, require_POST


def _reply(status: int = 200, **fields: Any) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), **fields}, status=status)


def _value(request: HttpRequest) -> Any:
    return json.loads(request.GET["value"])


def _timeout(request: HttpRequest) -> dict[str, float]:
    raw = request.GET.get("timeout")
    return {} if raw is None else {"timeout": float(raw)}


@require_GET
def pid(request: HttpRequest) -> JsonResponse:
    return _reply()


@require_POST
def add(request: HttpRequest) -> JsonResponse:
    return _reply(result=cache.add(request.GET["key"], _value(request), **_timeout(request)))


@require_POST
def set_(request: HttpRequest) -> JsonResponse:
    return _reply(result=cache.set(request.GET["key"], _value(request), **_timeout(request)))


@require_POST
def delete(request: HttpRequest) -> JsonResponse:
    return _reply(result=cache.delete(request.GET["key"]))


@require_POST
def clear(request: HttpRequest) -> JsonResponse:
    return _reply(result=cache.clear())


@require_POST
def incr(request: HttpRequest) -> JsonResponse:
    try:
        return _reply(result=cache.incr(request.GET["key"]))
    except ValueError as exc:  # Django's answer for a key the cache does not have
        return _reply(409, error=str(exc))


@require_GET
def get(request: HttpRequest) -> JsonResponse:
    return _reply(value=cache.get(request.GET["key"]))


@require_GET
def get_many(request: HttpRequest) -> JsonResponse:
    return _reply(values=cache.get_many(request.GET["keys"].split(",")))


@require_POST
def login(request: HttpRequest) -> JsonResponse:
    request.session.cycle_key()  # as django.contrib.auth.login: no session fixation
    request.session["user"] = request.GET["user"]
    request.session["cart"] = []
    return _reply(user=request.session["user"])


@require_POST
def cart(request: HttpRequest) -> JsonResponse:
    user = request.session.get("user")
    if user is not None:
        request.session["cart"] = [*request.session.get("cart", []), request.GET["item"]]
    return _reply(user=user, cart=request.session.get("cart"))


@require_GET
def whoami(request: HttpRequest) -> JsonResponse:
    return _reply(user=request.session.get("user"), cart=request.session.get("cart"))


@require_POST
def logout(request: HttpRequest) -> JsonResponse:
    request.session.flush()  # as django.contrib.auth.logout
    return _reply(user=None)


urlpatterns = [
    path("pid", pid),
    path("add", add),
    path("set", set_),
    path("delete", delete),
    path("clear", clear),
    path("incr", incr),
    path("get", get),
    path("get_many", get_many),
    path("login", login),
    path("cart", cart),
    path("whoami", whoami),
    path("logout", logout),
]
