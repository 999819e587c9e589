"""Shared fixtures: a throwaway project directory with its own DVC repo and local remote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root like the checkout: dvc.yaml, the code it lists as deps, data/raw, and DVC
    initialized with a local-directory remote inside tmp_path."""
    from llm_assets.lib.versioning import init_dvc

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "llm_assets").symlink_to(REPO / "llm_assets")  # dvc.yaml lists code files as deps
    (root / "data" / "raw").mkdir(parents=True)
    init_dvc(root, remote_url=str(tmp_path / "remote"))
    return root


@pytest.fixture
def tiny_run_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
