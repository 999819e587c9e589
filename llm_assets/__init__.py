"""llm-assets: the LLM lifecycle as one Dagster asset graph.

Offline by default: TRL's trainers report each run to the Hugging Face Hub (a telemetry thread),
and the Hub client would look a model name up online. Models here are built from a config and
trained here, so the Hub is never needed; these are defaults a user may override in the
environment. Set before any Hugging Face module reads them (they are read once, at import).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
