"""Fails when code grows past the shape the project keeps (issue 9).

- no function or method with a cyclomatic complexity above MAX_COMPLEXITY (radon);
- no class longer than MAX_CLASS_LINES lines.

Usage: python scripts/check_shape.py DIR_OR_FILE [...]
Prints every offender and exits 1 if there is one, else prints a one-line summary.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Class

MAX_COMPLEXITY = 15
MAX_CLASS_LINES = 400


def _files(args: list[str]) -> list[Path]:
    out: list[Path] = []
    for arg in args:
        path = Path(arg)
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


def _offences(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    found = []
    for block in cc_visit(source):  # functions and methods; classes listed apart
        if isinstance(block, Class) or block.complexity <= MAX_COMPLEXITY:
            continue
        found.append(
            f"{path}:{block.lineno}: {block.fullname} has complexity {block.complexity} "
            f"(max {MAX_COMPLEXITY})"
        )
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            length = node.end_lineno - node.lineno + 1
            if length > MAX_CLASS_LINES:
                found.append(
                    f"{path}:{node.lineno}: class {node.name} has {length} lines "
                    f"(max {MAX_CLASS_LINES})"
                )
    return found


def main(argv: list[str]) -> int:
    files = _files(argv or ["cachechain"])
    offences = [o for f in files for o in _offences(f)]
    for line in offences:
        print(line)
    if offences:
        print(f"shape check: {len(offences)} offence(s) in {len(files)} files")
        return 1
    print(
        f"shape check: {len(files)} files, no function above complexity {MAX_COMPLEXITY}, "
        f"no class above {MAX_CLASS_LINES} lines"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
