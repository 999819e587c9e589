"""Resources: the only door to the outside world. `LakeResource` owns the artifact root and DVC."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_assets.lib.common import versioning
from llm_assets.lib.common.paths import PROJECT_DIR_ENV, ProjectPaths, default_project_dir
from llm_assets.lib.common.atomic import atomic_dir, sweep_leftovers

class LakeResource(dg.ConfigurableResource):
    """The project directory: user data in `data/raw/`, artifacts in `data/lake/<asset>/`, each
    written atomically and versioned by DVC (commit + push to the default remote) after writing."""

    project_dir: str = Field(
        default_factory=lambda: str(default_project_dir()),
        description=f"Project root holding dvc.yaml and data/ (default: ${PROJECT_DIR_ENV} or the checkout).",
    )

    @property
    def root(self) -> Path:
        return Path(self.project_dir).resolve()

    @property
    def paths(self) -> ProjectPaths:
        """Every project directory (raw, incoming, lake, serving, releases, remote)."""
        return ProjectPaths(self.root)

    @property
    def raw_dir(self) -> Path:
        return self.paths.raw

    def artifact_dir(self, asset: str) -> Path:
        return self.paths.artifact(asset)

    def work_dir(self, asset: str) -> Path:
        """Scratch space that survives a crash (resumable checkpoints); never DVC-tracked."""
        path = self.paths.work(asset)
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
