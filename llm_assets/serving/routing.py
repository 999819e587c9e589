"""Canary routing: which loaded release answers a request when the release pointer names a canary.

    >>> from llm_assets.serving.routing import Split
    >>> split = Split()
    >>> [split.to_canary(0.25) for _ in range(8)]        # exactly a quarter, spread evenly
    [False, False, False, True, False, False, False, True]
    >>> split.to_canary(0.0), split.to_canary(0.5, key="user-7") == split.to_canary(0.5, key="user-7")
    (False, True)

`release` with `canary_share` > 0 writes the canary into `data/releases/current.json` (version,
path, share; lib/release/release.py). `CanaryRouter.route` gets the release the server loaded and
returns the model that answers: the canary for `share` of the requests, else the release. Without a
key the split is a counter (after n requests, exactly floor(n x share) went to the canary, so a
test can count them); with a key (a client id) it is a hash of the key, so one client always meets
the same version. Every routed request is counted in `llm_routed_requests_total{model_version,
route}` (route: release | canary): the version share on the dashboard. The served model's version
goes into the serving log with each request, so drift and evaluation can be split by version.

The canary is loaded (with the loader the server uses for the release) when the pointer first names
it, and dropped when the pointer no longer does (`llm-assets rollback`, or a full release).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from llm_assets.lib.release.release import current_release, pointer_path


class Split:
    """The routing decision alone: does this request go to the canary?"""

    def __init__(self):
        self._n = 0
        self._lock = threading.Lock()

    def to_canary(self, share: float, key: str | None = None) -> bool:
        if share <= 0:
            return False
        if key is not None:  # sticky: the key's hash as a number in [0, 1)
            return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64 < share
        with self._lock:
            n, self._n = self._n, self._n + 1
        return int((n + 1) * share) > int(n * share)  # the canary's count steps up exactly `share` per request


class CanaryRouter:
    """The canary named by the release pointer, loaded, and the split between it and the release.
    `load(path, version)` loads a model the way the server loads its release (it returns the
    server's `Served`, whose `.version` names it)."""

    def __init__(self, releases_dir: Path | None, load: Callable[[Path, str], Any], registry: CollectorRegistry):
        self.releases_dir = Path(releases_dir) if releases_dir is not None else None  # None: --model, no pointer
        self.load = load
        self.split = Split()
        self.canary: Any = None
        self.share = 0.0
        self._stamp = None
        self._lock = threading.Lock()
        self.routed = Counter("llm_routed_requests", "Requests by the model version chosen to answer them "
                              "(route: release or canary)", ["model_version", "route"], registry=registry)

    def refresh(self) -> None:
        """Follow the pointer's canary (a stat per call while the pointer is unchanged)."""
        if self.releases_dir is None:
            return
        pointer = pointer_path(self.releases_dir)
        stamp = pointer.stat().st_mtime_ns if pointer.is_file() else None
        if stamp == self._stamp:
            return
        with self._lock:
            record = current_release(self.releases_dir)
            entry = (record or {}).get("canary")
            if entry is None:
                self.canary, self.share = None, 0.0
            elif self.canary is None or self.canary.version != entry["version"]:
                self.canary = self.load(Path(entry["path"]), entry["version"])
            self.share = entry["share"] if entry else 0.0
            self._stamp = stamp

    def route(self, release: Any, key: str | None = None) -> Any:
        """The model that answers this request: the canary for `share` of them, else `release`."""
        self.refresh()
        canary = self.canary
        chosen = canary if canary is not None and self.split.to_canary(self.share, key) else release
        self.routed.labels(chosen.version, "canary" if chosen is canary else "release").inc()
        return chosen
