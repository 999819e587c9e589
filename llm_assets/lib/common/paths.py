"""Every project directory, named once. The Dagster resource, the CLI and the server all ask this.

    >>> from llm_assets.lib.common.paths import ProjectPaths
    >>> p = ProjectPaths("/srv/proj")
    >>> str(p.artifact("tokenizer")), str(p.releases), str(p.incoming)
    ('/srv/proj/data/lake/tokenizer', '/srv/proj/data/releases', '/srv/proj/data/incoming')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR_ENV = "LLM_ASSETS_PROJECT_DIR"


def default_project_dir() -> Path:
    """$LLM_ASSETS_PROJECT_DIR, else the checkout this package was installed from (editable
    install, the supported way), else the current directory."""
    if os.environ.get(PROJECT_DIR_ENV):
        return Path(os.environ[PROJECT_DIR_ENV]).resolve()
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "dvc.yaml").is_file() else Path.cwd().resolve()


@dataclass(frozen=True)
class ProjectPaths:
    """The directory layout under a project root (the folder holding dvc.yaml)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        """The user's corpus files."""
        return self.data / "raw"

    @property
    def sft(self) -> Path:
        """The user's instruction files (Alpaca / chat)."""
        return self.data / "sft"

    @property
    def preferences(self) -> Path:
        """The user's preference files (TRL / HH-RLHF)."""
        return self.data / "preferences"

    @property
    def incoming(self) -> Path:
        """The drop zone incoming_data_sensor watches."""
        return self.data / "incoming"

    @property
    def lake(self) -> Path:
        """Every materialized artifact, one DVC-tracked directory per asset."""
        return self.data / "lake"

    @property
    def serving(self) -> Path:
        """The server's request log (Parquet parts)."""
        return self.data / "serving"

    @property
    def releases(self) -> Path:
        """The release pointer (current.json) and its history."""
        return self.data / "releases"

    @property
    def remote(self) -> Path:
        """The default local DVC remote."""
        return self.data / "dvc-remote"

    def artifact(self, asset: str) -> Path:
        return self.lake / asset

    def work(self, asset: str) -> Path:
        """Scratch space that survives a crash (resumable checkpoints); never DVC-tracked."""
        return self.lake / ".work" / asset

    @property
    def locks(self) -> Path:
        """One writer lock per asset (`<asset>.lock`, `<asset>.holder`); never DVC-tracked."""
        return self.lake / ".locks"

    def user_dirs(self) -> list[Path]:
        """The directories `llm-assets init` creates."""
        return [self.raw, self.incoming, self.lake]
