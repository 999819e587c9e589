"""Releases: the model version the server may load, moved only by a model that passed its gates.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.release.release import Gate, current_release, history, publish
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

Layout under `releases_dir` (`data/releases/`):
- `<version>/`: a copy of the released model directory (`version` is its DVC hash, so
  `llm-assets restore quantized_model <version>` reproduces the same files), plus `release.json`;
- `current.json`: the pointer the server reads, replaced atomically (write + rename);
- `history.jsonl`: every release and every refusal, one line each, newest last.

`publish` is the one writer of this layout and `current_release` / `history` its readers;
`pointer_path` names the file a watcher stats to notice a new release.

`publish` refuses (raises `GatesFailed`, writes a refusal line, leaves `current.json` alone) when
any gate failed: the previous release stays what the server loads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llm_assets.lib.common.atomic import atomic_dir, write_text_atomically


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


def publish(model_dir: Path, releases_dir: Path, version: str, gates: list[Gate], info: dict) -> dict:
    """Copy `model_dir` to `releases_dir/<version>/` and point `current.json` at it, if every gate
    passed; otherwise record the refusal and raise GatesFailed naming the failed gates."""
    releases_dir = Path(releases_dir)
    releases_dir.mkdir(parents=True, exist_ok=True)
    previous = current_release(releases_dir)
    record = {"version": version, "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    pointer = pointer_path(releases_dir)
    write_text_atomically(pointer, json.dumps(record, indent=2))  # a reader sees the old pointer or the new one
    _append(releases_dir / HISTORY, {**record, "event": "released"})
    return record
