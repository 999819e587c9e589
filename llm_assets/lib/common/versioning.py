r"""Version artifact directories with DVC 3: record, look up and restore `data/lake/<stage>`.

Dagster writes `data/lake/<stage>/` itself, then calls `record_version(project, stage)`, which
runs `dvc commit -f <stage>` (dvc.lock + local cache) and pushes that stage's outputs to the
default remote. `restore_version` brings an earlier version back byte for byte.

DVC has one repo-wide lock and gives up after ~3 s when it is taken, so every DVC operation here
runs behind an inter-process file lock (`.dvc/tmp/llm_assets.lock`, waits up to LOCK_TIMEOUT_S):
concurrent materializations queue behind a long push instead of failing. A DVC command a person
runs by hand meanwhile can still collide with us and fails loudly ("Unable to acquire lock").

A SIGKILL at any moment leaves nothing the next operation cannot repair by itself. DVC rewrites
dvc.lock (and .dvc/tmp/rwlock) in place, truncate then write, so a kill inside `dvc commit` leaves
it empty or cut short. Each operation here therefore marks the stages it is recording
(`.dvc/tmp/llm_assets.pending.json`) and keeps a copy of dvc.lock from before it started
(`.dvc/tmp/llm_assets.dvc.lock.good`); the next operation finds the mark (or a dvc.lock DVC cannot
read), puts the copy back and records those stages again from what is on disk. An artifact renamed
into place by a run killed before it was recorded is recorded by the next `record_version` or
`restore_version` of any stage: the next materialization that records anything. Our own writes of
dvc.lock go through a temporary file and a rename.

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

import json
import os
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
# Crash-recovery files in .dvc/tmp (ignored by git and DVC): dvc.lock as it stood before the last
# operation, the stages an unfinished operation was recording, the scratch file behind every atomic
# write, and the last unreadable dvc.lock that was replaced (kept in case it was a hand edit).
_GOOD_LOCK = "llm_assets.dvc.lock.good"
_PENDING = "llm_assets.pending.json"
_SCRATCH = "llm_assets.write.tmp"
_BROKEN_LOCK = "llm_assets.dvc.lock.broken"


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
    """Commit `data/lake/<stage>` as written, push it to the default remote, return its version.

    Before that it records what a killed run left unrecorded (see `_record_unrecorded`), so the
    next materialization of any asset brings dvc.lock back in line with data/lake."""
    project_dir = Path(project_dir).resolve()
    with _dvc_lock(project_dir):
        left = _repair(project_dir)
        with _open(project_dir) as repo:
            _, out = _stage(repo, project_dir, stage)
            if not (project_dir / out).is_dir():
                raise VersioningError(f"stage {stage!r}: output directory {out} does not exist")
            with _pending(project_dir, [*left, stage]):
                _record_unrecorded(repo, project_dir, left, skip=stage)
                _commit_and_push(repo, stage, out)
        version = _recorded(project_dir, stage)
    if version is None:
        raise VersioningError(f"stage {stage!r}: dvc commit left no {out} entry in dvc.lock")
    return version


def current_version(project_dir: Path, stage: str) -> ArtifactVersion | None:
    """The version dvc.lock records for `stage`, or None if it was never recorded.

    Read with the lock held: `dvc commit` in another process rewrites dvc.lock in place, and a
    reader in between would find it empty."""
    project_dir = Path(project_dir).resolve()
    if not (project_dir / ".dvc").is_dir():  # the lock would create .dvc/tmp, and init_dvc then skip `dvc init`
        return None
    with _dvc_lock(project_dir):
        _repair(project_dir)
        return _recorded(project_dir, stage)


def _recorded(project_dir: Path, stage: str) -> ArtifactVersion | None:
    entry = _read_lock(project_dir).get("stages", {}).get(stage)
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
    anything is touched. Like `record_version`, it first records what a killed run left unrecorded.
    """
    project_dir = Path(project_dir).resolve()
    lock_path = project_dir / "dvc.lock"
    with _dvc_lock(project_dir):
        left = _repair(project_dir)
        with _open(project_dir) as repo:
            dvc_stage, out = _stage(repo, project_dir, stage)
            full = _resolve_hash(repo, stage, md5)
        # A fresh Repo for each step below: each changes dvc.lock, the cache or the workspace under
        # the one before.
        with _pending(project_dir, [*left, stage]):
            with _open(project_dir) as repo:
                _record_unrecorded(repo, project_dir, left, skip=stage)
            lock = _read_lock(project_dir) or {"schema": "2.0", "stages": {}}
            # Point dvc.lock at the wanted version and let DVC pull it: pull is DVC's own
            # fetch-what-is-missing-then-checkout. size/nfiles are dropped (DVC accepts that) and
            # rewritten by the commit below from the restored files.
            entry = lock["stages"].setdefault(stage, {"cmd": dvc_stage.cmd})
            entry["outs"] = [{"path": out, "hash": "md5", "md5": full}]
            _write_atomic(project_dir, lock_path, yaml.safe_dump(lock, sort_keys=False).encode())
            try:
                with _open(project_dir) as repo:
                    repo.pull(stage, force=True)
            except BaseException:
                # Leave dvc.lock describing the previous version, not one that never arrived. The
                # workspace may be half restored: the pending mark stays, so the next operation
                # records what is on disk (or restore again).
                _copy_atomic(project_dir, project_dir / ".dvc" / "tmp" / _GOOD_LOCK, lock_path)
                raise
            with _open(project_dir) as repo:
                repo.commit(stage, force=True)
        version = _recorded(project_dir, stage)
    if version is None or version.md5 != full:
        got = version.md5 if version else None
        raise VersioningError(f"stage {stage!r}: restored {out} hashes to {got}, wanted {full}")
    return version


def dvc_status(project_dir: Path) -> dict:
    """What `dvc status` run in the project root reports: {} means up to date, else e.g.
    {"b": [{"changed deps": {"data/lake/a": "modified"}}]}.

    A dvc.lock left broken by a kill is repaired first; an artifact a killed run left unrecorded
    shows as changed here (it is recorded by the next `record_version`, not by looking)."""
    project_dir = Path(project_dir).resolve()
    with _dvc_lock(project_dir):
        _repair(project_dir)
        with _open(project_dir) as repo:
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


def _repair(project_dir: Path) -> list[str]:
    """Undo what a killed operation left half done; returns the stages it was recording. Call with
    the lock held.

    With the pending mark there (an operation did not finish) or a dvc.lock DVC cannot read, dvc.lock
    goes back to the copy from before that operation; the caller records the stages again. Otherwise
    the copy is refreshed from dvc.lock, so it follows changes made by hand (`git checkout`, `dvc
    commit`) and exists from the first operation on."""
    tmp = project_dir / ".dvc" / "tmp"
    lock, good, pending = project_dir / "dvc.lock", tmp / _GOOD_LOCK, tmp / _PENDING
    _repair_rwlock(tmp / "rwlock")
    left = json.loads(pending.read_text()) if pending.exists() else None  # written atomically
    readable = _lock_readable(lock)
    if not readable:
        os.replace(lock, tmp / _BROKEN_LOCK)
    if left is not None or not readable:
        _copy_atomic(project_dir, good, lock)
    else:
        _copy_atomic(project_dir, lock, good)
    return left or []


def _repair_rwlock(rwlock: Path) -> None:
    """DVC notes which process reads or writes which path in .dvc/tmp/rwlock, rewritten in place; it
    drops entries of dead processes by itself but refuses a file cut short by a kill ("JSON structure
    is corrupted"). With our lock held no DVC operation of ours holds it, so a broken one can go."""
    try:
        json.loads(rwlock.read_text())
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, UnicodeDecodeError):
        rwlock.unlink()


def _lock_readable(lock: Path) -> bool:
    """dvc.lock is absent or passes DVC's own schema (empty or cut short by a kill, it does not)."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid

    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(lock.read_text()))
    except FileNotFoundError:
        return True
    except (yaml.YAMLError, UnicodeDecodeError, Invalid):
        return False
    return True


@contextmanager
def _pending(project_dir: Path, stages: list[str]) -> Iterator[None]:
    """Mark `stages` as being recorded until the block finishes, then keep a copy of dvc.lock. An
    exception or a kill leaves the mark, and the next operation's `_repair` finds it."""
    tmp = project_dir / ".dvc" / "tmp"
    _write_atomic(project_dir, tmp / _PENDING, json.dumps(sorted(set(stages))).encode())
    yield
    _copy_atomic(project_dir, project_dir / "dvc.lock", tmp / _GOOD_LOCK)
    (tmp / _PENDING).unlink()


def _record_unrecorded(repo: Repo, project_dir: Path, left: list[str], skip: str) -> None:
    """Commit and push what killed runs left unrecorded: every artifact directory on disk that
    dvc.lock does not describe (renamed into place, then killed before its `dvc commit`), and the
    stages in `left` (a killed DVC operation was recording them: their deps may have changed too).

    Only `data/lake/<stage>` outputs count; anything else DVC tracks is the user's. A stage whose
    deps are missing is left for its own next run (DVC cannot record it without them). The check
    costs a stat per file: DVC keeps file hashes by inode and mtime."""
    paths = ProjectPaths(project_dir)
    for dvc_stage in repo.index.stages:
        outs = [Path(o.fs_path) for o in dvc_stage.outs]
        if dvc_stage.name == skip or outs != [paths.artifact(dvc_stage.name)]:
            continue
        (out,) = dvc_stage.outs
        if (out.exists and all(dep.exists for dep in dvc_stage.deps)
                and (dvc_stage.name in left or out.changed_checksum())):
            _commit_and_push(repo, dvc_stage.name, outs[0].relative_to(project_dir).as_posix())


def _commit_and_push(repo: Repo, stage: str, out: str) -> None:
    repo.commit(stage, force=True)
    try:
        repo.push(stage)
    except Exception as e:  # each remote's fs raises its own types (OSError, botocore, ...)
        remote = repo.config["core"].get("remote")
        raise VersioningError(f"stage {stage!r}: pushing {out} to remote {remote!r} failed: {e}") from e


def _write_atomic(project_dir: Path, path: Path, data: bytes) -> None:
    """Replace `path` whole: a kill leaves the old file or the new one. The scratch file sits in
    .dvc/tmp, on the project's filesystem (rename is atomic there) and out of git's sight."""
    scratch = project_dir / ".dvc" / "tmp" / _SCRATCH
    with open(scratch, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do
    os.replace(scratch, path)


def _copy_atomic(project_dir: Path, src: Path, dst: Path) -> None:
    """`dst` becomes a copy of `src`, or goes when there is no `src` (no dvc.lock yet)."""
    if src.exists():
        _write_atomic(project_dir, dst, src.read_bytes())
    else:
        dst.unlink(missing_ok=True)


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
