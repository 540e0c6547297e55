"""The backends the framework suites run against, and how a suite process learns its.

A suite process reads its set-up from the environment (set by :mod:`tests.frameworks.run`):

- ``CACHECHAIN_FW_BACKEND``: one of :data:`DJANGO_BACKENDS` or :data:`FLASK_BACKENDS`;
- ``CACHECHAIN_FW_MEMCACHED``: ``"127.0.0.1:PORT"`` of the memcached the run started
  (for the backends that use one);
- ``CACHECHAIN_FW_SOURCES``: the directory the sdists' test files were extracted to;
- ``CACHECHAIN_FW_FLUSH``: ``"1"`` to flush memcached before every test (a diagnostic:
  the suites empty the cache with ``clear()`` between tests; what fails only without
  the flush is due to state an earlier test left in memcached);
- ``CACHECHAIN_FW_RESULT``: where the Django runner writes its JSON result.

The cachechain set-ups are the ones the README recommends: an in-process
``{"type": "memory"}`` L1 with a short ``max_ttl`` over a ``{"type": "memcached"}`` L2
(its codec is the default one the backends give it: pickle signed with the secret key).
``-l1`` and ``-l2`` variants keep one of the two layers, to tell which layer a failure
comes from; ``cachechain-nosecret`` (Flask only) is the app without a ``SECRET_KEY``,
whose memcached layer then stores tagged JSON (:class:`~cachechain.TaggedJsonCodec`);
``cachechain-location`` (Django only) is the default set-up, the memcached servers
in ``LOCATION`` and no ``OPTIONS``.
"""

from __future__ import annotations

import os
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "CACHELIB_HELPERS",
    "DJANGO_BACKENDS",
    "DJANGO_REFERENCE",
    "FLASK_BACKENDS",
    "FLASK_REFERENCE",
    "SECRET_KEY",
    "chain_options",
    "flush_memcached",
    "flush_requested",
    "memcached_address",
    "needs_memcached",
    "SDIST_FILES",
    "installed_version",
    "sdist_tests_dir",
    "selected_backend",
    "sources_dir",
]

#: Django backends: the stock ones first (the reference), then cachechain's set-ups.
DJANGO_BACKENDS = (
    "locmem",
    "pymemcache",
    "cachechain",
    "cachechain-location",
    "cachechain-l1",
    "cachechain-l2",
)
#: Flask-Caching backends, likewise.
FLASK_BACKENDS = (
    "simple",
    "memcached",
    "cachechain",
    "cachechain-nosecret",
    "cachechain-l1",
    "cachechain-l2",
)
DJANGO_REFERENCE = ("locmem", "pymemcache")
FLASK_REFERENCE = ("simple", "memcached")

#: The secret key of the Django settings and of the Flask app (keys the signed pickle).
SECRET_KEY = "cachechain-framework-suites-secret"

_WITH_MEMCACHED = frozenset(
    {
        "pymemcache",
        "memcached",
        "cachechain",
        "cachechain-nosecret",
        "cachechain-location",
        "cachechain-l2",
    }
)


def needs_memcached(backend: str) -> bool:
    """Whether ``backend`` stores in the run's memcached."""
    return backend in _WITH_MEMCACHED


def selected_backend(choices: tuple[str, ...]) -> str:
    """The backend named by ``CACHECHAIN_FW_BACKEND``; raises if it is not in ``choices``."""
    backend = os.environ.get("CACHECHAIN_FW_BACKEND", "")
    if backend not in choices:
        raise RuntimeError(
            f"CACHECHAIN_FW_BACKEND must be one of {choices}, got {backend!r}: run the "
            "suites with scripts/framework_suites.sh (python -m tests.frameworks.run)"
        )
    return backend


def memcached_address() -> str:
    """``"127.0.0.1:PORT"`` from ``CACHECHAIN_FW_MEMCACHED``."""
    address = os.environ.get("CACHECHAIN_FW_MEMCACHED", "")
    if not address:
        raise RuntimeError("CACHECHAIN_FW_MEMCACHED is not set: run tests.frameworks.run")
    return address


def sources_dir() -> Path:
    """The directory holding the extracted test files of the sdists."""
    sources = os.environ.get("CACHECHAIN_FW_SOURCES", "")
    if not sources or not Path(sources).is_dir():
        raise RuntimeError(
            f"CACHECHAIN_FW_SOURCES={sources!r} is not a directory: run "
            "scripts/framework_suites.sh, which fetches the sdists"
        )
    return Path(sources)


#: cachelib's test modules the Flask suite imports (``conftest`` for ``TestData``).
CACHELIB_HELPERS = ("conftest", "common", "clear", "has", "delete_many_with_prefix", "serializer")

#: The sdists whose test files the suites use (pip's name, the installed distribution's
#: name), and those files, relative to the sdist's top directory.
SDIST_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "django": ("Django", ("tests/cache/",)),
    "flask-caching": ("Flask-Caching", ("tests/test_backend_cache.py",)),
    "cachelib": (
        "cachelib",
        tuple(f"tests/{name}.py" for name in CACHELIB_HELPERS),
    ),
}


def installed_version(project: str) -> str:
    """The installed version of ``project`` (a key of :data:`SDIST_FILES`)."""
    return metadata.version(SDIST_FILES[project][0])


def sdist_tests_dir(project: str, sources: Path | None = None) -> Path:
    """``SOURCES/<project>-<installed version>/tests``: where the test files of the
    installed version's sdist are extracted."""
    base = sources if sources is not None else sources_dir()
    return base / f"{project}-{installed_version(project)}" / "tests"


def chain_options(backend: str) -> dict[str, Any]:
    """The chain mapping (Django ``OPTIONS``, Flask ``CACHE_OPTIONS``) of a cachechain
    ``backend``: L1 in memory and/or L2 on the run's memcached."""
    layers: list[dict[str, Any]] = []
    if backend != "cachechain-l2":
        layers.append({"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30})
    if backend != "cachechain-l1":
        layers.append(
            {
                "type": "memcached",
                "name": "L2",
                "servers": [memcached_address()],
                # generous: the suites are not about timeouts, and CI machines are slow
                "timeout": 1.0,
                "connect_timeout": 1.0,
            }
        )
    return {"name": "frameworks", "layers": layers}


def flush_memcached() -> None:
    """Send ``flush_all`` to the run's memcached (when the backend uses one)."""
    host, _, port = memcached_address().rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"flush_all\r\n")
        answer = sock.recv(64)
    if not answer.startswith(b"OK"):
        raise RuntimeError(f"memcached answered {answer!r} to flush_all")


def flush_requested() -> bool:
    """Whether ``CACHECHAIN_FW_FLUSH`` asks for a flush before every test."""
    return os.environ.get("CACHECHAIN_FW_FLUSH") == "1"
