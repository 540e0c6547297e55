"""Closing what might fail to close, while something else matters more."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["close_quietly"]

log = logging.getLogger("cachechain")


def close_quietly(obj: Any) -> None:
    """Call ``obj.close()`` if it has one. What it raises is logged at DEBUG, never
    raised: used while another error is being reported, or for best-effort cleanup."""
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.debug("could not close %r", obj, exc_info=True)
