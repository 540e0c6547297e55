"""A one-file Django project whose views cache through cachechain.

    pip install -e '.[django]'
    memcached -l 127.0.0.1 -p 11211 &          # or set CACHECHAIN_MEMCACHED=HOST:PORT
    python examples/django_app/app.py runserver

``/`` shows a report cached with ``cache.get_or_set`` (computed once per minute, once
per process however many requests miss together); ``/page/`` is a whole page cached
with ``cache_page``. Both are kept in an in-process layer (at most 30 s) in front of
memcached. Stop memcached and reload: the pages still answer, from the in-process
layer or by computing again.
"""

from __future__ import annotations

import os
import sys
import time

import django
from django.conf import settings

MEMCACHED = os.environ.get("CACHECHAIN_MEMCACHED", "127.0.0.1:11211")

settings.configure(
    DEBUG=False,
    # Also keys the signed pickle codec of the memcached layer: every process that
    # shares the memcached must use the same SECRET_KEY.
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-change-me"),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    CACHES={
        "default": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "TIMEOUT": 300,
            "KEY_PREFIX": "example",
            "OPTIONS": {  # the mapping of cachechain.chain_config_from_mapping
                "name": "django-example",
                "layers": [
                    # Short max_ttl: another process's delete does not reach this memory.
                    {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
                    # No "codec": signed pickle keyed by SECRET_KEY, so cache_page's
                    # HttpResponse objects reach memcached.
                    {
                        "type": "memcached",
                        "name": "L2",
                        "servers": [MEMCACHED],
                        "timeout": 0.1,
                        "connect_timeout": 0.1,
                    },
                ],
            },
        }
    },
)
django.setup()

from django.core.cache import cache  # noqa: E402 - after settings.configure
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.cache import cache_page  # noqa: E402


def build_report() -> dict[str, object]:
    """Stands for an expensive query."""
    time.sleep(0.2)
    return {"generated_at": time.time(), "pid": os.getpid()}


def report(request: HttpRequest) -> HttpResponse:
    return JsonResponse(cache.get_or_set("report", build_report, 60))


@cache_page(30)
def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"<p>rendered at {time.time():.6f}</p>")


urlpatterns = [path("", report), path("page/", page)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
