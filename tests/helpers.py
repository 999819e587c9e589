"""Helpers shared by the asset tests (importable because pytest's `pythonpath` includes tests/)."""

from pathlib import Path

import dagster as dg
import yaml

from llm_assets.defs.resources import LakeResource


def materialize_assets(assets: list, project: Path, run_config: dict, selection=None, instance=None):
    """`dg.materialize` of `assets` against the throwaway `project`; failures come back as results."""
    return dg.materialize(
        assets, selection=selection, run_config=run_config, instance=instance,
        resources={"lake": LakeResource(project_dir=str(project))}, raise_on_error=False)


def lock_md5(project: Path, stage: str) -> str:
    """The hash dvc.lock records for a stage's output directory."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def shifted_batch(n: int = 40) -> str:
    """A JSONL batch unlike the stdlib corpus: short Python modules (named by "path", so they yield
    instruction pairs) whose docstrings are the openings of the Python licence's paragraphs (short
    enough that the pairs fit the tiny config's 128-token examples: longer ones are dropped)."""
    import json
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    paras = [" ".join(p.split()[:12]) for p in text.split("\n\n") if len(p.split()) >= 12]
    lines = []
    for i in range(n):
        first, second = paras[i % len(paras)], paras[(i + 1) % len(paras)]
        source = (f'"""Licensing terms, clause {i}."""\n\n\ndef clause_{i}(licensee, year={1990 + i}):\n'
                  f'    """{first}"""\n    return licensee, year\n\n\n'
                  f'def holder_{i}(name, country="NL"):\n    """{second}"""\n    return name, country\n')
        lines.append(json.dumps({"path": f"licensing/clause_{i}.py", "text": source}))
    return "\n".join(lines) + "\n"
