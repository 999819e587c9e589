"""Resources: the only door to the outside world. `LakeResource` owns the artifact root and DVC."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_assets.lib import versioning
from llm_assets.lib.atomic import atomic_dir, sweep_leftovers

PROJECT_DIR_ENV = "LLM_ASSETS_PROJECT_DIR"


def default_project_dir() -> str:
    """$LLM_ASSETS_PROJECT_DIR, else the checkout this package was installed from (editable
    install, the supported way), else the current directory."""
    if os.environ.get(PROJECT_DIR_ENV):
        return os.environ[PROJECT_DIR_ENV]
    checkout = Path(__file__).resolve().parents[2]
    return str(checkout if (checkout / "dvc.yaml").is_file() else Path.cwd())


class LakeResource(dg.ConfigurableResource):
    """The project directory: user data in `data/raw/`, artifacts in `data/lake/<asset>/`, each
    written atomically and versioned by DVC (commit + push to the default remote) after writing."""

    project_dir: str = Field(
        default_factory=default_project_dir,
        description=f"Project root holding dvc.yaml and data/ (default: ${PROJECT_DIR_ENV} or the checkout).",
    )

    @property
    def root(self) -> Path:
        return Path(self.project_dir).resolve()

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    def artifact_dir(self, asset: str) -> Path:
        return self.root / "data" / "lake" / asset

    def work_dir(self, asset: str) -> Path:
        """Scratch space that survives a crash (resumable checkpoints); never DVC-tracked."""
        path = self.root / "data" / "lake" / ".work" / asset
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def write(self, asset: str) -> Iterator[Path]:
        """A staging directory that replaces `data/lake/<asset>` only if the block succeeds."""
        sweep_leftovers(self.artifact_dir(asset))  # debris of runs killed mid-write (never complete-looking)
        with atomic_dir(self.artifact_dir(asset)) as staging:
            yield staging

    def record(self, asset: str) -> versioning.ArtifactVersion:
        """Hash the artifact with DVC (`dvc commit -f <asset>`) and push it to the default remote."""
        return versioning.record_version(self.root, asset)


def artifact_metadata(path: Path, version: versioning.ArtifactVersion) -> dict:
    """The metadata every artifact-producing asset shows: where it is, how big, which DVC version."""
    return {
        "path": dg.MetadataValue.path(str(path)),
        "bytes": dg.MetadataValue.int(version.size),
        "files": dg.MetadataValue.int(version.nfiles),
        "dvc_md5": dg.MetadataValue.text(version.md5),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"lake": LakeResource(), "pipes_subprocess_client": dg.PipesSubprocessClient()})
