"""The trainers and workers stay readable: no function longer than a screen (issue 17)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 80


def long_functions(package: str, root: str = ROOT) -> list[str]:
    out = []
    for folder, _, files in os.walk(os.path.join(root, "megarl", package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_LINES:
                        out.append(f"{os.path.relpath(path, root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_in_trainers_or_workers_is_longer_than_a_screen():
    assert long_functions("trainers") + long_functions("workers") == []


def test_the_check_sees_long_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    os.makedirs(tmp_path / "megarl" / "fake")
    (tmp_path / "megarl" / "fake" / "m.py").write_text(f"def long():\n{body}\n")
    assert long_functions("fake", str(tmp_path)) == [f"megarl/fake/m.py:1 long ({MAX_LINES + 1} lines)"]
