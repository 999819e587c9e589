r"""Drift of text between a reference (what the model was trained on) and a current window (recent
serving traffic, or a newly arrived batch), measured with Evidently 0.7.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.monitor.drift import DriftSettings, describe, detect_drift, read_report, write_report
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> trained_on = [f"Explain what `mod.f{i}(x, y={i})` does." for i in range(40)]
    >>> traffic = [f"{i * 7919} {i * 104729} 0x{i:04x} ∑∫√ {i}" for i in range(40)]   # another domain
    >>> tok = train_tokenizer(trained_on, vocab_size=300)
    >>> model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    >>> reference, current = describe(trained_on, tok, model), describe(traffic, tok, model)
    >>> list(current.columns)             # the text + one column per descriptor
    ['text', 'length_chars', 'words', 'non_letter_share', 'byte_fallback_rate', 'perplexity']
    >>> result = detect_drift(reference, current, DriftSettings())
    >>> result.summary["drift_detected"], "text" in result.summary["drifted_columns"]
    (True, True)
    >>> out_dir = Path(tempfile.mkdtemp())
    >>> write_report(out_dir, result, {**result.summary, "source": "serving"}, current)
    >>> sorted(p.name for p in out_dir.iterdir())
    ['current.parquet', 'report.html', 'summary.json']
    >>> summary, frame = read_report(out_dir)
    >>> summary["source"], summary["current_rows"], len(frame)
    ('serving', 40, 40)

Descriptors per text (numbers Evidently compares column by column): length in characters, words,
the share of characters that are not letters, the byte-fallback rate (share of tokens that are raw
bytes of the tokenizer's alphabet: text the tokenizer never learned to merge, such as another
script or binary junk), and the perplexity under the released model (optional: what the model finds
surprising). The text itself is compared by Evidently's text drift (a TF-IDF domain classifier; the
column drifts when it tells the two windows apart with ROC AUC >= `text_threshold`).

A drift_report directory holds `report.html` (Evidently's), `summary.json` (the figures) and
`current.parquet` (the current window with its descriptors): `write_report` writes it, `read_report`
reads it back (`read_summary`: the figures alone).

Defaults, from calibration on this project's own text (FIELD_NOTES, and the quality tests): numeric
columns by the two-sample Kolmogorov-Smirnov test (p < 0.05), which accounts for the window's size:
PSI, calibrated at 2,000 rows a side in FIELD_NOTES, flagged every descriptor of a 67-row window
drawn from the reference itself. `text_threshold` 0.7 because new files of the same kind share few
identifiers and a TF-IDF classifier separates them a little (AUC 0.6-0.67). Dataset drift when at
least half of the columns drift.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TypeVar

import numpy as np
from pydantic import Field

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.tokenizer.tokenizer import BYTE_ALPHABET, SPECIAL_TOKENS

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
REPORT_HTML, SUMMARY, CURRENT = "report.html", "summary.json", "current.parquet"
DESCRIPTORS = ("length_chars", "words", "non_letter_share", "byte_fallback_rate", "perplexity")
_WORD = re.compile(r"\w+")


class DriftSettings(Settings):
    """When a column, and when the whole window, counts as drifted (calibration: the module docstring)."""

    num_method: str = Field("ks", description="Evidently's test for the numeric descriptors: ks = two-sample "
                                              "Kolmogorov-Smirnov, drift when p < num_threshold.")
    num_threshold: float = Field(0.05, description="Kolmogorov-Smirnov p-value below which a descriptor counts as drifted.")
    text_method: str = Field("abs_text_content_drift", description="Evidently's method for the text column: "
                             "abs_text_content_drift = a TF-IDF domain classifier, usable at any window size.")
    text_threshold: float = Field(0.7, description="ROC AUC of that classifier at which the text column counts as drifted.")
    drift_share: float = Field(0.5, description="Share of drifted columns at which the window counts as drifted (dataset drift).")


@dataclass
class DriftResult:
    summary: dict
    snapshot: object  # evidently Snapshot: save_html / json


def perplexities(texts: list[str], tokenizer, model, max_tokens: int = 128, batch: int = 32) -> list[float]:
    """Per-text perplexity under `model` of the first max_tokens tokens (after the eos boundary)."""
    from llm_assets.lib.posttrain.chat_data import reply_logprobs

    examples = []
    for t in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"][: max_tokens - 1]]
        examples.append({"input_ids": ids, "labels": ids})  # every token after the boundary is scored
    return [math.exp(min(-total / max(1, n), 50.0)) for total, n in
            reply_logprobs(model, examples, tokenizer.pad_token_id, batch_size=batch)]


def describe(texts: list[str], tokenizer=None, model=None) -> pd.DataFrame:
    """The text column plus the descriptors (byte fallback needs the tokenizer, perplexity the model)."""
    import pandas as pd  # here: ~0.7 s that every process loading the Dagster definitions paid

    frame = pd.DataFrame({"text": texts})
    frame["length_chars"] = [float(len(t)) for t in texts]
    frame["words"] = [float(len(_WORD.findall(t))) for t in texts]
    frame["non_letter_share"] = [sum(not c.isalpha() for c in t) / max(1, len(t)) for t in texts]
    if tokenizer is not None:
        first, last = len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + BYTE_ALPHABET
        rates = []
        for ids in (tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
            rates.append(sum(first <= i < last for i in ids) / max(1, len(ids)))
        frame["byte_fallback_rate"] = rates
    if model is not None:
        frame["perplexity"] = perplexities(texts, tokenizer, model) if texts else []
    return frame


def detect_drift(reference: pd.DataFrame, current: pd.DataFrame, s: DriftSettings | None = None) -> DriftResult:
    """Evidently's data drift over the text and every descriptor column the two frames share."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    s = s or DriftSettings()
    if reference.empty or current.empty:
        raise ValueError(f"drift needs rows on both sides (reference {len(reference)}, current {len(current)})")
    numeric = [c for c in DESCRIPTORS if c in reference.columns and c in current.columns]
    definition = DataDefinition(text_columns=["text"], numerical_columns=numeric)
    columns = ["text", *numeric]
    preset = DataDriftPreset(columns=columns, num_method=s.num_method, num_threshold=s.num_threshold,
                             text_method=s.text_method, text_threshold=s.text_threshold, drift_share=s.drift_share)
    snapshot = Report([preset], include_tests=True).run(
        current_data=Dataset.from_pandas(current[columns], data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns], data_definition=definition))
    result = snapshot.dict()
    scores = {}
    for metric in result["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("ValueDrift"):
            scores[config["column"]] = {"score": float(metric["value"]), "method": config["method"],
                                        "threshold": float(config["threshold"])}
    drifted = []
    for test in result["tests"]:
        name = test["name"]
        if name.startswith("Value Drift for column ") and str(test["status"]).endswith("FAIL"):
            drifted.append(name.removeprefix("Value Drift for column "))
    share = len(drifted) / len(columns)
    summary = {
        "drift_detected": share >= s.drift_share,
        "drift_share": share,
        "drifted_columns": sorted(drifted),
        "columns": columns,
        "scores": scores,
        "reference_rows": len(reference),
        "current_rows": len(current),
    }
    return DriftResult(summary, snapshot)


def sample(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """At most n of `items`, drawn without replacement, reproducibly, in their original order.

    >>> sample(list("abcdefgh"), 3), sample(["a", "b"], 3)
    (['e', 'f', 'h'], ['a', 'b'])
    """
    if len(items) <= n:
        return list(items)
    idx = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in np.sort(idx)]


def write_report(out_dir: Path, result: DriftResult, summary: dict, current: pd.DataFrame) -> None:
    """Evidently's HTML report, `summary` (result.summary plus what the caller adds: source, window)
    and the current window's frame, into `out_dir` (a staging dir)."""
    out_dir = Path(out_dir)
    result.snapshot.save_html(str(out_dir / REPORT_HTML))
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    current.to_parquet(out_dir / CURRENT)


def read_summary(report_dir: Path) -> dict:
    """The figures (`summary.json`) of a drift report directory: what the server exports as metrics."""
    return json.loads((Path(report_dir) / SUMMARY).read_text())


def read_report(report_dir: Path) -> tuple[dict, pd.DataFrame]:
    """(summary, current window frame) of a drift report directory."""
    import pandas as pd

    return read_summary(report_dir), pd.read_parquet(Path(report_dir) / CURRENT)
