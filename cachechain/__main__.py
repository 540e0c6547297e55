"""``python -m cachechain``: the same as the ``cachechain`` command."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    sys.exit(main())
