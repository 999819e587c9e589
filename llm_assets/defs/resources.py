"""Resources: the only door to the outside world. `LakeResource` owns the artifact root and DVC."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from llm_assets.lib.common import versioning
from llm_assets.lib.common.paths import PROJECT_DIR_ENV, ProjectPaths, default_project_dir
from llm_assets.lib.common.atomic import atomic_dir, sweep_dir, sweep_leftovers
from llm_assets.lib.common.writer_lock import WriterLocks

class LakeResource(dg.ConfigurableResource):
    """The project directory: user data in `data/raw/`, artifacts in `data/lake/<asset>/`, each
    written atomically and versioned by DVC (commit + push to the default remote) after writing.

    One run writes an asset at a time (lib/common/writer_lock.py says why a second one fails at
    once by default): `write`, `work_dir` and `record` take the asset's writer lock, and the run
    keeps it until it ends (its step ends, under the multiprocess executor), so what the step reads
    back for its metadata, and what the run's later steps read, is the version this run wrote."""

    project_dir: str = Field(
        default_factory=lambda: str(default_project_dir()),
        description=f"Project root holding dvc.yaml and data/ (default: ${PROJECT_DIR_ENV} or the checkout).",
    )
    writer_wait_s: float = Field(
        0.0, ge=0,
        description="Seconds a run waits for another run that is writing the same asset; past that it fails "
                    "naming that run. 0 (the default) fails at once.",
    )
    _holder: str = PrivateAttr(default="a process outside a Dagster run")
    _locks: WriterLocks | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A fresh set of locks per run, named after it (one resource object can serve several runs).
        if context.run is not None:
            self._holder = f"run {context.run.run_id}"
        self._locks = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._locks is not None:
            self._locks.release_all()

    def claim(self, asset: str) -> None:
        """Become the only writer of `asset` (artifact, work dir, DVC record) until the run ends.
        `write`, `work_dir` and `record` claim by themselves; an asset that reads its own earlier
        output before writing (incoming_batch) claims first."""
        if self._locks is None:
            self._locks = WriterLocks(self.paths.locks, self._holder, self.writer_wait_s,
                                      on_wait=dg.get_dagster_logger().warning)
        self._locks.hold(asset)

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
        self.claim(asset)  # two runs sharing it would resume from each other's checkpoints
        path = self.paths.work(asset)
        path.mkdir(parents=True, exist_ok=True)
        sweep_dir(path)  # checkpoints half written by a killed run (their writer is gone)
        return path

    @contextlib.contextmanager
    def write(self, asset: str) -> Iterator[Path]:
        """A staging directory that replaces `data/lake/<asset>` only if the block succeeds."""
        self.claim(asset)
        sweep_leftovers(self.artifact_dir(asset))  # debris of runs killed mid-write (never complete-looking)
        with atomic_dir(self.artifact_dir(asset)) as staging:
            yield staging

    def record(self, asset: str) -> versioning.ArtifactVersion:
        """Hash the artifact with DVC (`dvc commit -f <asset>`) and push it to the default remote;
        the version returned is this run's (no other run can write the asset meanwhile)."""
        self.claim(asset)
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
