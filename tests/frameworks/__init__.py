"""The frameworks' own cache test suites, run against cachechain's backends.

Django's ``tests/cache/tests.py`` (``BaseCacheTests`` and the http-level classes),
Flask-Caching's ``GenericCacheTests`` and cachelib's generic test mixins come from the
sdists of the installed versions (``scripts/framework_suites.sh`` downloads and
extracts them into ``.tools/frameworks/``); the modules here are the glue that points
those suites at a backend:

- :mod:`tests.frameworks.backends`: the backends a suite can run against (the stock
  ones as a reference, cachechain in several layer set-ups) and the environment
  variables that pass the choice to a suite process;
- :mod:`tests.frameworks.django_settings`, :mod:`tests.frameworks.django_cache_tests`
  and :mod:`tests.frameworks.django_runner`: Django's suite, run by Django's own
  ``DiscoverRunner`` (a test database for the ``TestCase`` classes);
- :mod:`tests.frameworks.flask_cache_tests`: Flask-Caching's and cachelib's suites,
  run by pytest with ``tests/frameworks/pytest.ini``;
- :mod:`tests.frameworks.run`: starts a memcached per run, runs each suite against
  each backend in its own process and prints the table.

None of these modules is named ``test_*.py``: the project's own ``pytest`` run does not
collect them (the suites need the sdists and take a minute).
"""
