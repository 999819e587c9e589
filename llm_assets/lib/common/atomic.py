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
the previous artifact is left exactly as it was. A SIGKILL leaves it behind instead; its name says
who wrote it (`.staging-<target>-<pid>@<host>-<token>`), so `sweep_leftovers` removes it as soon
as that process is gone, and never while it lives.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
# `<target>-<pid>@<host>-<token>` after the prefix; names from before owners were recorded end in
# `<target>-<token>` and fall back to the age rule.
_OWNED = re.compile(r"(?P<target>.+)-(?P<owner>\d+@[^@/]+)-[0-9a-f]{8}")
_UNOWNED = re.compile(r"(?P<target>.+)-[0-9a-f]{8}")
# Seconds of slack when comparing a process's start time with a file time: both clocks tick in
# 10 ms steps, and a false "gone" would delete a live writer's files.
_CLOCK_SLACK_S = 1.0


def owner() -> str:
    """This process as "<pid>@<host>": written into staging names and run tags so that a later
    process can tell whether the writer still runs."""
    return f"{os.getpid()}@{socket.gethostname()}"


def owner_gone(tag: str, since: float) -> bool | None:
    """Whether the process `tag` ("<pid>@<host>") has exited; None when it cannot be told (another
    host, or not such a tag).

    `since` is a time the owner was known to be at work (when it made the directory, or started the
    run): a process holding that pid now but started after it is a newcomer reusing the pid."""
    pid, _, host = tag.partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(pid))
        # A killed process whose parent has not reaped it yet is a zombie: gone all the same.
        return process.status() == psutil.STATUS_ZOMBIE or process.create_time() > since + _CLOCK_SLACK_S
    except psutil.NoSuchProcess:
        return True


def write_text_atomically(path: Path, text: str) -> None:
    """Replace the file `path` whole: readers see the old text or the new, never half of it (the
    text goes to `.<name>.<pid>` beside it, then is renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"{target.name}-{owner()}-{uuid.uuid4().hex[:8]}"
    staging = target.parent / f"{STAGING_PREFIX}{suffix}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Linux cannot rename a directory over a non-empty one, so the old artifact is first moved
    # aside. Between the two renames the target is briefly absent, never half-written.
    trash = target.parent / f"{TRASH_PREFIX}{suffix}"
    if target.exists():
        target.rename(trash)
    staging.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_leftovers(target: Path, older_than_s: float = 3600.0) -> list[Path]:
    """Remove the staging/trash directories of `target` whose writer is gone; returns them.

    Call it before writing `target` again. A directory whose writer (named in it) has exited goes at
    once; one whose writer still runs stays, so a second run of the same asset never pulls a write
    in progress from under its feet. Only when the writer cannot be told (a name from before owners
    were recorded, or another host on a shared disk) does the directory have to sit untouched for
    `older_than_s` first."""
    target = Path(target)
    return _sweep(target.parent, older_than_s, only=target.name)


def sweep_dir(directory: Path, older_than_s: float = 3600.0) -> list[Path]:
    """`sweep_leftovers` for every target in `directory` at once: e.g. an asset's work directory,
    where a killed run leaves half-written checkpoints."""
    return _sweep(Path(directory), older_than_s, only=None)


def _sweep(directory: Path, older_than_s: float, only: str | None) -> list[Path]:
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.glob(f"{STAGING_PREFIX}*")) + sorted(directory.glob(f"{TRASH_PREFIX}*")):
        parsed = _parse(path.name)
        if parsed is None or (only is not None and parsed[0] != only) or not path.is_dir():
            continue
        if _abandoned(path, parsed[1], older_than_s):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _parse(name: str) -> tuple[str, str | None] | None:
    """(target, owner) from a leftover's name; owner None in names from before owners were recorded."""
    rest = name.removeprefix(STAGING_PREFIX).removeprefix(TRASH_PREFIX)
    if match := _OWNED.fullmatch(rest):
        return match["target"], match["owner"]
    if match := _UNOWNED.fullmatch(rest):
        return match["target"], None
    return None


def _abandoned(path: Path, tag: str | None, older_than_s: float) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:  # its writer just renamed it into place or removed it
        return False
    # ctime: when the writer last made, renamed or filled the directory (a rename keeps the old
    # mtime, so a trash directory's mtime says nothing about its writer).
    gone = owner_gone(tag, stat.st_ctime) if tag else None
    if gone is not None:
        return gone
    return time.time() - stat.st_mtime > older_than_s
