r"""Version artifact directories with DVC 3: record, look up and restore `data/lake/<stage>`.

Dagster writes `data/lake/<stage>/` itself, then calls `record_version(project, stage)`, which
runs `dvc commit -f <stage>` (dvc.lock + local cache) and pushes that stage's outputs to the
default remote. `restore_version` brings an earlier version back byte for byte.

DVC has one repo-wide lock and gives up after ~3 s when it is taken, so every DVC operation here
runs behind an inter-process file lock (`.dvc/tmp/llm_assets.lock`, waits up to LOCK_TIMEOUT_S):
concurrent materializations queue behind a long push instead of failing. A DVC command a person
runs by hand meanwhile can still collide with us and fails loudly ("Unable to acquire lock").

Run on its own, on a project with a one-stage dvc.yaml:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.common.versioning import init_dvc, record_version, restore_version
    >>> project = Path(tempfile.mkdtemp())
    >>> _ = (project / "dvc.yaml").write_text(
    ...     "stages:\n  raw_corpus:\n    cmd: llm-assets materialize --select raw_corpus\n"
    ...     "    outs: [data/lake/raw_corpus]\n")
    >>> corpus = project / "data/lake/raw_corpus/corpus.txt"
    >>> corpus.parent.mkdir(parents=True)
    >>> _ = corpus.write_text("version one")
    >>> init_dvc(project)                     # remote "local" at data/dvc-remote
    >>> first = record_version(project, "raw_corpus")
    >>> first.path, first.nfiles, first.size
    ('data/lake/raw_corpus', 1, 11)
    >>> _ = corpus.write_text("version two")
    >>> record_version(project, "raw_corpus").md5 != first.md5
    True
    >>> restore_version(project, "raw_corpus", first.short) == first
    True
    >>> corpus.read_text()
    'version one'
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.repo import Repo
from dvc.stage import Stage
from filelock import FileLock, Timeout

from llm_assets.lib.common.paths import ProjectPaths

# Seconds to wait for another process's DVC operation. Pushing a large checkpoint to S3 can take
# minutes, and a queue of materializations adds up; a stuck holder should still surface.
LOCK_TIMEOUT_S = 30 * 60
DEFAULT_REMOTE_NAME = "local"
_HEX = re.compile(r"[0-9a-f]+")
_MIN_PREFIX = 8


class VersioningError(RuntimeError):
    """A DVC versioning step failed; the message names the stage and path."""


@dataclass(frozen=True)
class ArtifactVersion:
    """One recorded version of `data/lake/<stage>`, as dvc.lock describes it."""

    stage: str
    path: str  # output directory, relative to the project root, e.g. "data/lake/raw_corpus"
    md5: str  # DVC directory hash, e.g. "3f2a...c1.dir"
    size: int  # bytes, summed over all files
    nfiles: int

    @property
    def short(self) -> str:
        return self.md5[:12]


def init_dvc(project_dir: Path, remote_url: str | Path | None = None) -> None:
    """Make `project_dir` a DVC project with a default remote; safe to call every time.

    An existing default remote (e.g. S3 set with `dvc remote add -d`) is left alone; otherwise
    remote "local" becomes the default, at `remote_url` (a URL such as s3://bucket/x, or a local
    directory, relative paths taken from `project_dir`) or at `<project>/data/dvc-remote`.
    Call it once before starting concurrent work: two processes initializing the same fresh
    directory at once race in `dvc init` (the lock lives inside .dvc/).
    """
    from dvc.config_schema import RelPath

    project_dir = Path(project_dir).resolve()
    if not (project_dir / ".dvc").is_dir():
        git_root = _git_root(project_dir)
        # `dvc init` in a git repo needs --subdir unless it is the repo root.
        Repo.init(
            str(project_dir),
            no_scm=git_root is None,
            subdir=git_root is not None and git_root != project_dir,
        ).close()
    with _dvc_lock(project_dir), _open(project_dir) as repo:
        if repo.config["core"].get("remote"):
            return
        if remote_url is None:
            url = RelPath(ProjectPaths(project_dir).remote)
            Path(url).mkdir(parents=True, exist_ok=True)
        elif "://" in str(remote_url) or Path(remote_url).is_absolute():
            url = str(remote_url)
        else:
            url = RelPath(project_dir / remote_url)
        # A RelPath is written relative to .dvc/ ("../data/dvc-remote"), so the config stays
        # valid in every clone; a plain relative string would be taken from the process's cwd.
        # Only the project's .dvc/config is written, never the user's global config.
        with repo.config.edit("repo") as conf:
            conf["remote"][DEFAULT_REMOTE_NAME] = {"url": url}
            conf["core"]["remote"] = DEFAULT_REMOTE_NAME


def record_version(project_dir: Path, stage: str) -> ArtifactVersion:
    """Commit `data/lake/<stage>` as written, push it to the default remote, return its version."""
    project_dir = Path(project_dir).resolve()
    with _dvc_lock(project_dir), _open(project_dir) as repo:
        _, out = _stage(repo, project_dir, stage)
        if not (project_dir / out).is_dir():
            raise VersioningError(f"stage {stage!r}: output directory {out} does not exist")
        repo.commit(stage, force=True)
        try:
            repo.push(stage)
        except Exception as e:  # each remote's fs raises its own types (OSError, botocore, ...)
            remote = repo.config["core"].get("remote")
            raise VersioningError(
                f"stage {stage!r}: pushing {out} to remote {remote!r} failed: {e}"
            ) from e
    version = current_version(project_dir, stage)
    if version is None:
        raise VersioningError(f"stage {stage!r}: dvc commit left no {out} entry in dvc.lock")
    return version


def current_version(project_dir: Path, stage: str) -> ArtifactVersion | None:
    """The version dvc.lock records for `stage`, or None if it was never recorded."""
    entry = _read_lock(Path(project_dir)).get("stages", {}).get(stage)
    if entry is None:
        return None
    (out,) = entry["outs"]  # one output directory per stage, by design
    return ArtifactVersion(
        stage=stage, path=out["path"], md5=out["md5"], size=out["size"], nfiles=out["nfiles"]
    )


def restore_version(project_dir: Path, stage: str, md5: str) -> ArtifactVersion:
    """Put version `md5` of `stage` back into the workspace and dvc.lock.

    `md5` is the full directory hash (with or without ".dir") or a unique prefix of at least 8
    hex chars. Objects missing from the local cache are fetched from the default remote. The
    current files are overwritten, including uncommitted changes. An unknown hash raises before
    anything is touched.
    """
    project_dir = Path(project_dir).resolve()
    lock_path = project_dir / "dvc.lock"
    with _dvc_lock(project_dir):
        with _open(project_dir) as repo:
            dvc_stage, out = _stage(repo, project_dir, stage)
            full = _resolve_hash(repo, stage, md5)
            old_lock_text = lock_path.read_text() if lock_path.exists() else None
            lock = _read_lock(project_dir) or {"schema": "2.0", "stages": {}}
            # Point dvc.lock at the wanted version and let DVC pull it: pull is DVC's own
            # fetch-what-is-missing-then-checkout. size/nfiles are dropped (DVC accepts that) and
            # rewritten by the commit below from the restored files.
            entry = lock["stages"].setdefault(stage, {"cmd": dvc_stage.cmd})
            entry["outs"] = [{"path": out, "hash": "md5", "md5": full}]
            try:
                lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
                repo.pull(stage, force=True)
            except BaseException:
                # Leave dvc.lock describing the previous version, not one that never arrived.
                # The workspace may be half restored; restore or re-record to repair it.
                if old_lock_text is None:
                    lock_path.unlink()
                else:
                    lock_path.write_text(old_lock_text)
                raise
        # A fresh Repo: the pull changed the cache and workspace under the previous one.
        with _open(project_dir) as repo:
            repo.commit(stage, force=True)
    version = current_version(project_dir, stage)
    if version is None or version.md5 != full:
        got = version.md5 if version else None
        raise VersioningError(f"stage {stage!r}: restored {out} hashes to {got}, wanted {full}")
    return version


def dvc_status(project_dir: Path) -> dict:
    """What `dvc status` run in the project root reports: {} means up to date, else e.g.
    {"b": [{"changed deps": {"data/lake/a": "modified"}}]}."""
    project_dir = Path(project_dir).resolve()
    with _dvc_lock(project_dir), _open(project_dir) as repo:
        return repo.status()


@contextmanager
def _dvc_lock(project_dir: Path) -> Iterator[None]:
    lock_path = Path(project_dir) / ".dvc" / "tmp" / "llm_assets.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock_path, timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout as e:
        raise VersioningError(
            f"waited {LOCK_TIMEOUT_S} s for {lock_path}: another process is still running a DVC "
            "operation in this project (a stuck materialization?)"
        ) from e


@contextmanager
def _open(project_dir: Path) -> Iterator[Repo]:
    """A fresh Repo, run from the project root. Call with the lock held.

    A long-lived Repo goes stale when another process changes the cache. DVC resolves stage
    names, stage-cache paths and status keys against the process's cwd and fails when it is
    outside the repo (commit of a stage with deps: "file path ... is outside of DVC repo"), so
    the cwd is the project root meanwhile: the lock keeps other threads' DVC calls out, but a
    thread relying on the cwd at that moment would see the change.
    """
    with chdir(project_dir):
        repo = Repo(str(project_dir))
        try:
            yield repo
        finally:
            repo.close()


def _git_root(path: Path) -> Path | None:
    for d in (path, *path.parents):
        if (d / ".git").exists():  # a dir, or a file in worktrees and submodules
            return d
    return None


def _read_lock(project_dir: Path) -> dict:
    lock_path = project_dir / "dvc.lock"
    if not lock_path.exists():
        return {}
    return yaml.safe_load(lock_path.read_text()) or {}


def _stage(repo: Repo, project_dir: Path, stage: str) -> tuple[Stage, str]:
    """The DVC stage and its single output path, relative to the project root."""
    from dvc.stage.exceptions import StageNotFound

    try:
        (dvc_stage,) = repo.stage.collect(stage)
    except StageNotFound as e:
        raise VersioningError(f"stage {stage!r} is not in {project_dir / 'dvc.yaml'}") from e
    if len(dvc_stage.outs) != 1:
        raise VersioningError(
            f"stage {stage!r} must have exactly one output directory, has {len(dvc_stage.outs)}"
        )
    return dvc_stage, Path(dvc_stage.outs[0].fs_path).relative_to(project_dir).as_posix()


def _resolve_hash(repo: Repo, stage: str, md5: str) -> str:
    """Full "<hex>.dir" for a full hash or unique prefix found in the local cache or remote."""
    hex_part = md5.removesuffix(".dir").lower()
    if not _HEX.fullmatch(hex_part) or not _MIN_PREFIX <= len(hex_part) <= 32:
        raise VersioningError(
            f"stage {stage!r}: {md5!r} is not an md5 directory hash or a prefix of at least "
            f"{_MIN_PREFIX} hex chars"
        )
    # Both stores keep objects under <2 hex>/<30 hex>, so a lookup costs one directory listing.
    # The remote is only asked when the local cache has no match (a prefix must be unique in
    # the first store that has it).
    stores = (lambda: repo.cache.local, lambda: repo.cloud.get_remote_odb(command="restore"))
    found: set[str] = set()
    for store in stores:
        try:
            found = {store().exists_prefix(hex_part)}
        except KeyError:
            continue
        except ValueError as e:  # several objects share the prefix: e.args == (prefix, oids)
            found = set(e.args[1])
        found = {oid for oid in found if oid.endswith(".dir")}  # file objects are not versions
        if found:
            break
    if not found:
        raise VersioningError(
            f"stage {stage!r}: no version {md5!r} in the local cache or the default remote; "
            "the current artifact is unchanged"
        )
    if len(found) > 1:
        raise VersioningError(f"stage {stage!r}: prefix {md5!r} is ambiguous: {sorted(found)}")
    return found.pop()
