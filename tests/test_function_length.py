"""No function in llm_assets/ is longer than 80 lines (nested functions count on their own): past
that, split it into named steps that read top to bottom."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llm_assets"
MAX_LINES = 80


def function_lengths() -> list[tuple[int, str]]:
    """(lines, "path:name") of every function and method, decorators left out, longest first."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1,
                              f"{path.relative_to(PACKAGE.parent).as_posix()}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_the_walk_sees_functions():
    lengths = function_lengths()
    assert len(lengths) > 100 and any(name.endswith(" train") for _, name in lengths)


def test_no_function_is_longer_than_80_lines():
    too_long = [f"{name} ({n} lines)" for n, name in function_lengths() if n > MAX_LINES]
    assert not too_long, f"functions over {MAX_LINES} lines: " + ", ".join(too_long)
