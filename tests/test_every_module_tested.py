"""The test suite's own layout: every lib module has a test file of its own that imports it, and test
modules share code through helpers.py and fixtures through conftest.py, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LIB = TESTS.parent / "llm_assets" / "lib"
LIB_MODULES = sorted(p for p in LIB.glob("*/*.py") if p.name != "__init__.py")
TEST_MODULES = sorted(p for p in TESTS.rglob("*.py") if p.name.startswith("test_"))
SHARED = {"conftest", "helpers", "dagster_procs", "servers"}  # importable from tests/ (pytest's pythonpath)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, by its dotted name (`from a.b import c` gives a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def dotted(module: Path) -> str:
    return ".".join(module.relative_to(LIB.parent.parent).with_suffix("").parts)


@pytest.mark.parametrize("module", LIB_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lib_module_has_a_test_file_that_imports_it(module: Path):
    test_file = TESTS / "lib" / f"test_{module.stem}.py"
    assert test_file.is_file(), f"{dotted(module)} has no tests/lib/{test_file.name}"
    assert dotted(module) in imported_modules(test_file), f"{test_file.name} does not import {dotted(module)}"


def test_there_are_lib_modules_to_check():
    assert len(LIB_MODULES) > 25 and len({p.parent.name for p in LIB_MODULES}) >= 8


@pytest.mark.parametrize("test_module", TEST_MODULES, ids=lambda p: str(p.relative_to(TESTS)))
def test_test_modules_do_not_import_each_other(test_module: Path):
    top_level = {name.split(".")[0] for name in imported_modules(test_module)}
    others = sorted(n for n in top_level if n.startswith("test_") or n == "conftest")
    assert not others, (f"{test_module.name} imports {others}: move shared helpers to tests/helpers.py "
                        f"and fixtures to tests/conftest.py")


def test_the_import_check_sees_test_module_imports(tmp_path):
    bad = tmp_path / "test_x.py"
    bad.write_text("from test_training_assets import materialize\nimport conftest\nfrom helpers import UPSTREAM\n")
    assert {"test_training_assets", "conftest", "helpers"} <= imported_modules(bad)
