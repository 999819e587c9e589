"""The package's shape: lib is grouped by lifecycle stage and imports only flow downstream; lib and
the serving side never import dagster."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm_assets"
# lib/<stage>/ in lifecycle order: a stage may import itself and the stages before it, never after.
STAGES = ["common", "data", "tokenizer", "pretrain", "posttrain", "evaluate", "release", "monitor"]


def imports_of(path: Path) -> set[str]:
    """Every llm_assets / dagster module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("llm_assets", "dagster")}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["llm_assets", "lib"] and parts[2] in STAGES else None


def test_lib_holds_only_stage_folders():
    assert sorted(p.name for p in (PACKAGE / "lib").iterdir() if p.suffix == ".py" and p.name != "__init__.py") == []
    assert sorted(p.name for p in (PACKAGE / "lib").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)


@pytest.mark.parametrize("path", sorted((PACKAGE / "lib").glob("*/*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lib_imports_flow_downstream(path):
    own = STAGES.index(path.relative_to(PACKAGE / "lib").parts[0])
    for module in imports_of(path):
        assert not module.startswith("dagster"), f"{path}: lib must not import dagster ({module})"
        assert not module.startswith(("llm_assets.defs", "llm_assets.serving", "llm_assets.cli")), f"{path} imports {module}"
        stage = stage_of(module)
        if stage is not None:
            assert STAGES.index(stage) <= own, f"{path} ({STAGES[own]}) imports {module} from later stage {stage}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "serving").rglob("*.py")) + sorted((PACKAGE / "workers").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_serving_and_workers_do_not_import_dagster_or_defs(path):
    bad = {m for m in imports_of(path) if m.startswith(("dagster", "llm_assets.defs", "llm_assets.cli"))}
    assert not bad, f"{path} imports {sorted(bad)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above must be able to fail: a function-level upstream import is found."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from llm_assets.lib.monitor import drift\n")
    assert stage_of(next(iter(imports_of(bad)))) == "monitor"


def test_readme_tree_lists_every_lib_module():
    """The README's layout tree is the map a newcomer reads: it must name every stage folder and module."""
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme[readme.index("## Layout"):]
    for stage in STAGES:
        assert f"    {stage}/ " in tree, f"README's tree lacks lib/{stage}/"
        for module in sorted((PACKAGE / "lib" / stage).glob("*.py")):
            if module.name != "__init__.py":
                assert f"      {module.name} " in tree, f"README's tree lacks lib/{stage}/{module.name}"
