"""The WSGI application of the example, for gunicorn (from the repository root)::

    gunicorn --chdir examples/flask_app --workers 4 wsgi:application

The cache (and its chain) is built when ``app`` is imported: with ``--preload`` that
is in gunicorn's master, and every worker gets a copy by ``fork``, where cachechain
restarts its threads (the coherence poller, the async writers) and reopens its
connections.
"""

from __future__ import annotations

from app import app as application

__all__ = ["application"]
