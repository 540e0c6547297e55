"""The result of one suite run on one backend, as the suite processes write it (JSON).

``{"suite", "backend", "flush", "seconds", "total", "passed", "skipped": {test: reason},
"failed": {test: cause}}``: a test is failed when it (or one of its subtests) failed or
raised; its cause is one line, ``ExceptionType: first line of the message``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SuiteResult", "one_line"]

_MAX_CAUSE = 150


def one_line(exc_type: str, message: str) -> str:
    """``"ExcType: first line of message"``, shortened to a table cell."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    text = f"{exc_type}: {first}" if first else exc_type
    return text if len(text) <= _MAX_CAUSE else text[: _MAX_CAUSE - 3] + "..."


@dataclass
class SuiteResult:
    """What one run of a suite on a backend gave."""

    suite: str
    backend: str
    flush: bool = False
    seconds: float = 0.0
    total: int = 0
    passed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: set when the suite process itself failed (no result file, a crash)
    crashed: str = ""

    def add_failure(self, test: str, cause: str) -> None:
        """Record a failure of ``test`` (the first cause of a test is kept)."""
        self.failed.setdefault(test, cause)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the result as JSON to ``path``."""
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SuiteResult:
        """Read a result that :meth:`write` wrote."""
        data = json.loads(Path(path).read_text())
        return cls(**data)
