r"""Run-config YAML files (configs/demo.yaml, configs/tiny.yaml): `ops:` sections per asset, merged
and cut down to the assets a run selects (Dagster rejects config for assets outside the run).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.common.run_config import merge
    >>> demo = Path(tempfile.mkdtemp()) / "demo.yaml"
    >>> _ = demo.write_text("ops:\n  raw_corpus: {config: {include_stdlib: true}}\n"
    ...                     "  tokenizer: {config: {vocab_size: 8192}}\n")
    >>> merge([demo], {"tokenizer"}, overrides={"tokenizer": {"vocab_size": 512}})
    {'ops': {'tokenizer': {'config': {'vocab_size': 512}}}}

Runs people start pass files with `llm-assets materialize --config`; runs sensors and schedules
start read `$LLM_ASSETS_CONFIG` (paths separated by `:`, relative to the project), by default
`configs/demo.yaml` when the project has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

CONFIG_ENV = "LLM_ASSETS_CONFIG"
DEFAULT_AUTOMATION_CONFIG = "configs/demo.yaml"


def merge(paths: list[str | Path], selected_ops: set[str], overrides: dict[str, dict] | None = None) -> dict:
    """Later files override earlier ones field by field (as `dagster job launch -c a.yaml -c b.yaml`
    does: a file setting one field of an asset keeps the others); `ops` keeps only selected assets;
    `overrides` ({asset: {field: value}}) go on top."""
    merged: dict = {}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a run-config file must be a mapping, got {type(data).__name__}")
        _deep_update(merged, data)
    if "ops" in merged:
        merged["ops"] = {k: v for k, v in merged["ops"].items() if k in selected_ops}
    for asset, fields in (overrides or {}).items():
        merged.setdefault("ops", {}).setdefault(asset, {}).setdefault("config", {}).update(fields)
    return merged


def _deep_update(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def automation_paths(project_dir: Path) -> list[Path]:
    raw = os.environ.get(CONFIG_ENV)
    if raw:
        paths = [Path(project_dir) / p for p in raw.split(os.pathsep) if p]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"${CONFIG_ENV} names missing file(s): {', '.join(missing)}")
        return paths
    default = Path(project_dir) / DEFAULT_AUTOMATION_CONFIG
    return [default] if default.is_file() else []


def for_automation(project_dir: Path, assets: set[str], overrides: dict[str, dict] | None = None) -> dict:
    """Run config for a run a sensor or schedule starts: the automation files' `ops` for `assets`,
    then `overrides` ({asset: {field: value}}) on top."""
    return merge(automation_paths(project_dir), assets, overrides)
