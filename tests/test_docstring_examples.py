"""Usage examples that run: every module docstring's example is a doctest, and this executes them.

Each module of `llm_assets` is imported and the docstrings it defines (the module's own first) are
run with `doctest`, in a temp dir of the test's own (examples make their files with
`tempfile.mkdtemp()`). A second test keeps examples from going stale again: a docstring may not
show Python code as a plain indented block, which nothing would run.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import re
import tempfile

import pytest

import llm_assets

MODULES = sorted(m.name for m in pkgutil.walk_packages(llm_assets.__path__, "llm_assets."))
# Plain indented Python in a docstring's prose: `    from x import y`, `    import x`,
# `    with f() as x:`, `    name = ...`, `    a, b = ...`, `    f(...)`, `    obj.method(...)`.
# Shell lines (`    python -m ...`, `    llm-assets serve`) and prose are not matched.
CODE_LINE = re.compile(r"^ {2,}(?:from [\w.]+ import \w|import [\w.]+|with .+:\s*(?:#.*)?$|"
                       r"[\w.]+(?:\[[^\]]*\])?(?:\s*,\s*[\w.]+)*\s*=(?!=)\s*\S|[\w.]+\()")


def _module_doctests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    # Only docstrings defined in the module itself (not those of names it imports).
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() lands in the test's tmp dir
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in _module_doctests(name):
        runner.run(test, out=out.write)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s)\n{out.getvalue()}"


def plain_code_lines(docstring: str) -> list[str]:
    """Indented lines of Python in a docstring's prose, i.e. outside its `>>>` examples (an example
    runs from its `>>>` line through its expected output, up to the next blank line, as in doctest)."""
    found, in_example = [], False
    for line in docstring.splitlines():
        if line.lstrip().startswith(">>>"):
            in_example = True
        elif not line.strip():
            in_example = False
        elif not in_example and CODE_LINE.match(line):
            found.append(line.strip())
    return found


@pytest.mark.parametrize("name", MODULES)
def test_code_in_module_docstrings_is_executed(name):
    """A usage example must be a `>>>` doctest (which the test above runs), not a plain code block."""
    doc = importlib.import_module(name).__doc__ or ""
    assert not plain_code_lines(doc), (
        f"{name}: the module docstring shows code that nothing runs; write it as `>>>` lines: "
        f"{plain_code_lines(doc)}")


def test_every_lib_module_shows_a_running_example():
    """Each lib module says how to use it on its own (STYLE.md, house rule 2), by an example that runs."""
    lib = [n for n in MODULES if n.startswith("llm_assets.lib.") and n.count(".") == 3]  # lib.<stage>.<module>
    assert len(lib) > 25
    without = [n for n in lib if not any(t.name == n for t in _module_doctests(n))]
    assert not without, f"lib modules whose docstring has no `>>>` example: {without}"


@pytest.mark.parametrize("text, found", [
    ("Use it:\n\n    result = deduplicate(docs, DedupParams())\n", ["result = deduplicate(docs, DedupParams())"]),
    ("    from pathlib import Path\n", ["from pathlib import Path"]),
    ("    with atomic_dir(target) as tmp:\n        write(tmp)\n", ["with atomic_dir(target) as tmp:", "write(tmp)"]),
    ("    a, b = f(1)\n    log.close()\n", ["a, b = f(1)", "log.close()"]),
    ("    >>> x = f(1)\n    >>> x.close()\n    'ok'\n", []),  # doctests are executed: fine
    ("    python -m llm_assets.lib.data.minhash FILE...\n    llm-assets serve --port 8000\n", []),
    ("A sentence mentioning f(x) inline, and a == b.\n", []),
])
def test_the_checker_tells_plain_code_from_doctests(text, found):
    assert plain_code_lines(text) == found
