"""Releases: the model version the server may load, moved only by a model that passed its gates.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.release.release import Gate, current_release, history, publish, rollback
    >>> model_dir, releases_dir = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> _ = (model_dir / "model.safetensors").write_bytes(b"weights")
    >>> current_release(releases_dir) is None                # before the first release
    True
    >>> gates = [Gate("quantized_perplexity_within_budget", True, 1.05, 1.002)]
    >>> record = publish(model_dir, releases_dir, version="ab12cd34", gates=gates, info={"method": "nf4"})
    >>> sorted(p.name for p in (releases_dir / "ab12cd34").iterdir())
    ['model.safetensors', 'release.json']
    >>> current_release(releases_dir)["path"] == record["path"] == str(releases_dir / "ab12cd34")
    True
    >>> publish(model_dir, releases_dir, version="ef56", info={},
    ...         gates=[Gate("aligned_preference_accuracy", False, 0.6, 0.52)])
    Traceback (most recent call last):
    llm_assets.lib.release.release.GatesFailed: release refused, the current release stays ab12cd34: failed aligned_preference_accuracy (observed 0.52, threshold 0.6)
    >>> current_release(releases_dir)["version"], [(r["version"], r["event"]) for r in history(releases_dir)]
    ('ab12cd34', [('ab12cd34', 'released'), ('ef56', 'refused')])

A candidate can first take a share of the traffic (a canary) beside the current release, then be
released in full, or walked back:

    >>> canary = publish(model_dir, releases_dir, version="9f9f", gates=gates, info={}, canary_share=0.25)
    >>> canary["version"], canary["canary"]["version"], canary["canary"]["share"]
    ('ab12cd34', '9f9f', 0.25)
    >>> "canary" in rollback(releases_dir)                   # the canary is withdrawn, the release stays
    False
    >>> _ = publish(model_dir, releases_dir, version="9f9f", gates=gates, info={})
    >>> current_release(releases_dir)["version"], rollback(releases_dir)["version"]   # back to the one before
    ('9f9f', 'ab12cd34')
    >>> rollback(releases_dir, "nope")
    Traceback (most recent call last):
    ValueError: cannot roll back to nope: it was never released here (released: 9f9f, ab12cd34)
    >>> [r["event"] for r in history(releases_dir)][2:]
    ['canary', 'canary_withdrawn', 'released', 'rolled_back']

Layout under `releases_dir` (`data/releases/`):
- `<version>/`: a copy of the released model directory (`version` is its DVC hash, so
  `llm-assets restore quantized_model <version>` reproduces the same files), plus `release.json`;
- `current.json`: the pointer the server reads, replaced atomically (write + rename): the release
  record (version, path, gates, previous, ...) and, while one runs, `canary`: {version, path, share},
  the candidate that answers `share` of the requests (llm_assets/serving/routing.py decides which);
- `history.jsonl`: every release, canary, rollback and refusal, one line each, newest last.

`publish` and `rollback` write this layout, both through `_point` (the one writer of the pointer and
its history line); `current_release` / `history` are its readers; `pointer_path` names the file a
watcher stats to notice a new release.

`rollback` walks back: with a canary running, it withdraws the canary (the release stays); otherwise
it points at the release before the current one (its `previous`), or at a named earlier version.
The pointer then holds that version's own record, so a second rollback walks further back.

`publish` refuses (raises `GatesFailed`, writes a refusal line, leaves `current.json` alone) when
any gate failed: the previous release stays what the server loads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field

from llm_assets.lib.common.atomic import atomic_dir, write_text_atomically
from llm_assets.lib.common.settings import Settings


class ReleaseSettings(Settings):
    """How a candidate that passed its gates is released."""

    canary_share: float = Field(0.0, ge=0, lt=1, description="0: release the candidate in full. Between 0 and 1: "
                                "the candidate becomes the canary and answers this share of requests beside the "
                                "current release, until released in full (run again with 0) or withdrawn "
                                "(`llm-assets rollback`).")


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    threshold: float
    observed: float
    rule: str = ""  # a human sentence: "perplexity <= aligned x 1.05"


class GatesFailed(RuntimeError):
    pass


POINTER = "current.json"
HISTORY = "history.jsonl"


def pointer_path(releases_dir: Path) -> Path:
    """`current.json`: replaced atomically by each release."""
    return Path(releases_dir) / POINTER


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def current_release(releases_dir: Path) -> dict | None:
    """The pointer's record (version, path, gates, ...), or None before the first release."""
    pointer = pointer_path(releases_dir)
    return json.loads(pointer.read_text()) if pointer.is_file() else None


def history(releases_dir: Path) -> list[dict]:
    path = Path(releases_dir) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _point(releases_dir: Path, record: dict, line: dict) -> dict:
    """Replace the pointer with `record` (a reader sees the old pointer or the new one), then log `line`."""
    write_text_atomically(pointer_path(releases_dir), json.dumps(record, indent=2))
    _append(Path(releases_dir) / HISTORY, {**line, "time": _now()})
    return record


def publish(model_dir: Path, releases_dir: Path, version: str, gates: list[Gate], info: dict,
            canary_share: float = 0.0) -> dict:
    """Copy `model_dir` to `releases_dir/<version>/` and point `current.json` at it, if every gate
    passed; otherwise record the refusal and raise GatesFailed naming the failed gates. With
    `canary_share` in (0, 1) and a different version released, the candidate becomes the canary
    (that share of requests) and the release stays; with nothing released yet it is released."""
    if not 0 <= canary_share < 1:
        raise ValueError(f"canary_share must be in [0, 1), got {canary_share}")
    releases_dir = Path(releases_dir)
    releases_dir.mkdir(parents=True, exist_ok=True)
    previous = current_release(releases_dir)
    record = {"version": version, "released_at": _now(),
              "gates": [asdict(g) for g in gates], "previous": previous["version"] if previous else None, **info}
    failed = [g for g in gates if not g.passed]
    if not gates or failed:
        _append(releases_dir / HISTORY, {**record, "event": "refused"})
        why = ", ".join(f"{g.name} (observed {g.observed:.4g}, threshold {g.threshold:.4g})" for g in failed) or "no gates"
        kept = previous["version"] if previous else "none"
        raise GatesFailed(f"release refused, the current release stays {kept}: failed {why}")
    target = releases_dir / version
    if not target.is_dir():  # the same version released again reuses its copy
        with atomic_dir(target) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            (tmp / "release.json").write_text(json.dumps(record, indent=2))
    record["path"] = str(target)
    if canary_share > 0 and previous is not None and previous["version"] != version:
        canary = {"version": version, "path": str(target), "share": canary_share}
        _point(releases_dir, {**previous, "canary": canary}, {**record, **canary, "event": "canary"})
        return {**previous, "canary": canary}
    return _point(releases_dir, record, {**record, "event": "released"})


def released_versions(releases_dir: Path) -> list[str]:
    """Versions with a release copy under `releases_dir` (released or tried as a canary), newest first."""
    lines = [h["version"] for h in reversed(history(releases_dir)) if h["event"] in ("released", "canary")]
    return [v for v in dict.fromkeys(lines) if (Path(releases_dir) / v / "release.json").is_file()]


def rollback(releases_dir: Path, version: str | None = None) -> dict:
    """Withdraw the running canary, or point at `version` (default: the current release's previous);
    the new pointer record is returned. Raises ValueError when there is nothing to walk back to."""
    releases_dir = Path(releases_dir)
    current = current_release(releases_dir)
    if current is None:
        raise ValueError(f"nothing to roll back: {pointer_path(releases_dir)} does not exist")
    if version is None and current.get("canary"):
        record = {k: v for k, v in current.items() if k != "canary"}
        return _point(releases_dir, record, {"event": "canary_withdrawn", "version": current["canary"]["version"],
                                             "release": current["version"]})
    target = version or current.get("previous")
    if target is None:
        raise ValueError(f"cannot roll back: release {current['version']} has no previous release")
    copy = releases_dir / target / "release.json"
    if not copy.is_file():
        raise ValueError(f"cannot roll back to {target}: it was never released here "
                         f"(released: {', '.join(released_versions(releases_dir)) or 'none'})")
    record = {**json.loads(copy.read_text()), "path": str(copy.parent)}
    return _point(releases_dir, record, {"event": "rolled_back", "version": target, "from": current["version"]})
