"""The Dagster code location: everything under `llm_assets/defs/` is discovered, not hand-listed."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
