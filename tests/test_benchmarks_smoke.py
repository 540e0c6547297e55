"""The benchmark script still runs: a --quick pass (its numbers mean nothing) must end
with every section measured and every honesty check true."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    assert len(sections) == len(_run_module().SECTIONS)  # every section ran
    for section in sections:
        assert section["error"] in (None, ""), (section["id"], section["error"])
        assert all(check["ok"] for check in section["checks"]), section["id"]


def _run_module() -> Any:
    """benchmarks/run.py, imported from its file."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
