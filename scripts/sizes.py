"""Report modules over 400 lines and functions over 60 (the house rule; see COMMON/STYLE).

``python scripts/sizes.py gateway worker shared``: prints each offender and exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE, MAX_FUNCTION = 400, 60


def offenders(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE:
            out.append(f"{path}: module of {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    out.append(f"{path}:{node.lineno}: {node.name}() of {n} lines")
    return out


if __name__ == "__main__":
    found = [o for arg in sys.argv[1:] or ["gateway", "worker", "shared"] for o in offenders(Path(arg))]
    print("\n".join(found) or "sizes ok")
    sys.exit(1 if found else 0)
