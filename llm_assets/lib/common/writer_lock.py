"""One writer per asset: an inter-process lock per asset that names the run holding it.

Two runs writing one asset at once disagree with what is on disk: the last rename wins the files
and dvc.lock, but the other run's metadata reports the winner's DVC version and counts, and a
resumable work dir hands one run's checkpoint to the other. So a run takes `<asset>.lock` (flock
through `filelock`) before it writes the artifact, its work dir or its DVC record. The kernel drops
a flock when its process ends, so a run killed with SIGKILL never leaves a stale lock. Who holds it
(run, pid, host, since when) is written to `<asset>.holder` beside it, for the message the next
writer gets.

A second writer fails at once by default (`wait_s=0`) naming the holder: a run holds an asset until
it ends (seconds for raw_corpus, hours for a whole-graph run), and a second run that waited silently
that long would then replace the first run's result with its own config. Failing at once tells the
person which run to wait for or cancel. `wait_s > 0` queues instead, for writers nobody watches;
two runs that each hold an asset the other wants then meet the time limit, not a deadlock.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.common.writer_lock import AssetBusy, WriterLocks
    >>> lock_dir = Path(tempfile.mkdtemp())
    >>> first = WriterLocks(lock_dir, "run 1f2e3d4c")
    >>> first.hold("raw_corpus"); first.hold("raw_corpus")   # holding twice is holding once
    >>> try:
    ...     WriterLocks(lock_dir, "run 99aa88bb").hold("raw_corpus")
    ... except AssetBusy as e:
    ...     print(str(e).split(" (pid")[0])
    raw_corpus is being written by run 1f2e3d4c
    >>> first.release_all()
    >>> WriterLocks(lock_dir, "run 99aa88bb").hold("raw_corpus")   # free again
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from llm_assets.lib.common.atomic import write_text_atomically


_ADVICE = "one run writes an asset at a time; wait for that run to finish, or cancel it, then materialize again"


class AssetBusy(RuntimeError):
    """Another run holds the asset's writer lock; the message names that run."""


class WriterLocks:
    """The writer locks one run holds, by asset name, until `release_all` (or the process ends)."""

    def __init__(self, lock_dir: Path, holder: str, wait_s: float = 0.0,
                 on_wait: Callable[[str], None] | None = None):
        """`holder` names this run in other runs' messages (e.g. "run 1f2e3d4c-..."); `on_wait`
        hears why a hold is waiting, when `wait_s > 0` and the asset is taken."""
        self.lock_dir = Path(lock_dir)
        self.holder = f"{holder} (pid {os.getpid()} on {socket.gethostname()})"
        self.wait_s = wait_s
        self.on_wait = on_wait
        self._held: dict[str, FileLock] = {}

    def hold(self, asset: str) -> None:
        """Become the only writer of `asset`; raises AssetBusy naming the holder when another run
        keeps it past `wait_s` seconds."""
        if asset in self._held:
            return
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        # thread_local=False: Dagster may release from another thread than the one that acquired.
        lock = FileLock(self.lock_dir / f"{asset}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not self.wait_s:
                raise AssetBusy(f"{self._taken(asset)}: {_ADVICE}") from None
            if self.on_wait:
                self.on_wait(f"{self._taken(asset)}; waiting up to {self.wait_s:g} s")
            try:
                lock.acquire(timeout=self.wait_s)
            except Timeout:
                raise AssetBusy(f"{self._taken(asset)}; waited {self.wait_s:g} s: {_ADVICE}") from None
        self._held[asset] = lock
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text_atomically(self._holder_file(asset), f"{self.holder} since {since}")

    def release_all(self) -> None:
        for asset, lock in list(self._held.items()):
            # The holder text goes first: once the lock is free, the next writer writes its own.
            self._holder_file(asset).unlink(missing_ok=True)
            lock.release()
            del self._held[asset]

    def _holder_file(self, asset: str) -> Path:
        return self.lock_dir / f"{asset}.holder"

    def _taken(self, asset: str) -> str:
        try:
            holder = self._holder_file(asset).read_text()
        except FileNotFoundError:  # taken a moment ago, not described yet
            holder = "another process"
        return f"{asset} is being written by {holder}"
