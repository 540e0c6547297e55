"""The WSGI application of the example, for gunicorn (from the repository root)::

    gunicorn --chdir examples/django_app --workers 4 wsgi:application

The cache is built here, at import, so that a bad ``CACHES`` stops gunicorn at boot
rather than failing the first request; with ``--preload`` the chain is then built in
gunicorn's master and copied into every worker by ``fork``, where cachechain restarts
its threads (the coherence poller, the async writers) and reopens its connections.
"""

from __future__ import annotations

import app  # noqa: F401 - configures Django (settings, URLs)
from django.core.cache import caches
from django.core.wsgi import get_wsgi_application

caches["default"]  # builds the backend (and its chain) now, see the docstring
application = get_wsgi_application()
