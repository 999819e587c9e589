"""Shared fixtures: a throwaway project directory with its own DVC repo and local remote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _dvc_env(tmp_path_factory: pytest.TempPathFactory):
    """DVC keeps per-repo state under /var/tmp/dvc/ and reports analytics by default: keep test
    repos' state in the test's temp dir and stay offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site")))
    mp.setenv("DVC_NO_ANALYTICS", "1")
    yield
    mp.undo()


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
