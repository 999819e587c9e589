"""Atomic artifact directories: a crash never leaves a half-written artifact that looks complete.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.common.atomic import atomic_dir
    >>> target = Path(tempfile.mkdtemp()) / "raw_corpus"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "corpus.parquet").write_text("v1")
    ...     target.exists()              # nothing there until the block finishes
    False
    >>> (target / "corpus.parquet").read_text()
    'v1'
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "corpus.parquet").write_text("v2, half written")
    ...     raise RuntimeError("killed")
    Traceback (most recent call last):
    RuntimeError: killed
    >>> (target / "corpus.parquet").read_text(), sorted(p.name for p in target.parent.iterdir())
    ('v1', ['raw_corpus'])

The staging directory sits next to the target (same filesystem, so `rename` is atomic) under a
dot-prefixed name that DVC and git ignore. On an exception the staging directory is removed and
the previous artifact is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Linux cannot rename a directory over a non-empty one, so the old artifact is first moved
    # aside. Between the two renames the target is briefly absent, never half-written.
    trash = target.parent / f"{TRASH_PREFIX}{target.name}-{token}"
    if target.exists():
        target.rename(trash)
    staging.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_leftovers(target: Path, older_than_s: float = 3600.0) -> list[Path]:
    """Remove staging/trash directories of `target` left behind by a killed process; returns them.

    Only directories untouched for `older_than_s` go, so a write still in progress elsewhere (a
    second run of the same asset) is never pulled from under its feet."""
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    now = time.time()
    for prefix in (STAGING_PREFIX, TRASH_PREFIX):
        for path in target.parent.glob(f"{prefix}{target.name}-*"):
            if path.is_dir() and now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
