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
