"""The benchmark script still runs: a --quick pass (its numbers mean nothing) must end
with every section measured and every honesty check true."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_quick_run_completes_with_honest_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert len(sections) == 8
    for section in sections:
        assert section["error"] in (None, ""), (section["id"], section["error"])
        assert all(check["ok"] for check in section["checks"]), section["id"]
