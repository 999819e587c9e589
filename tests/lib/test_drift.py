"""Drift detection on real text: serving-style prompts built from the standard library (the
reference), another domain (the Python licence text), and same-distribution random splits."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from llm_assets.lib.monitor.drift import DriftSettings, describe, detect_drift, read_report, write_report
from llm_assets.lib.posttrain.instructions import derive_pairs

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def prompts():
    files = sorted(p for p in STDLIB.glob("*.py"))[:150]
    pairs = derive_pairs((f"stdlib/{p.name}", p.read_text(errors="replace")) for p in files)
    return [p.instruction for p in pairs]


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return AutoTokenizer.from_pretrained(tiny_base_dir)


def licence_paragraphs() -> list[str]:
    text = (STDLIB / "LICENSE.txt").read_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 8]
    return [f"{p[:300]}" for p in paras]


def test_another_domain_is_flagged(prompts, tok):
    assert len(prompts) >= 1200
    reference = describe(prompts[:1000], tok)
    current = describe(licence_paragraphs()[:200], tok)
    result = detect_drift(reference, current)
    assert result.summary["drift_detected"], result.summary
    assert "text" in result.summary["drifted_columns"]
    assert result.summary["scores"]["text"]["score"] > 0.9  # the classifier separates them almost perfectly
    html = result.snapshot.get_html_str(as_iframe=False) if hasattr(result.snapshot, "get_html_str") else None
    assert html is None or "<html" in html.lower()


def test_same_distribution_splits_are_rarely_flagged(prompts, tok):
    frame = describe(prompts, tok)
    flagged = []
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(len(frame))
        reference, current = frame.iloc[order[:1000]], frame.iloc[order[1000:1200]]
        flagged.append(detect_drift(reference, current).summary["drift_detected"])
    print(f"same-distribution splits flagged: {sum(flagged)}/20")
    assert sum(flagged) <= 1


def test_empty_window_is_an_error(tok):
    with pytest.raises(ValueError, match="rows on both sides"):
        detect_drift(describe(["a"], tok), describe([], tok))


def test_settings_are_passed_to_evidently(prompts, tok):
    frame = describe(prompts[:400], tok)
    strict = detect_drift(frame.iloc[:300], frame.iloc[300:], DriftSettings(num_threshold=1e-9, drift_share=0.2))
    assert strict.summary["drift_detected"]  # any difference at all counts under an absurd threshold


def test_a_written_report_reads_back(prompts, tok, tmp_path):
    reference, current = describe(prompts[:200], tok), describe(prompts[200:260], tok)
    result = detect_drift(reference, current)
    summary = {**result.summary, "source": "serving", "window": "a .. b"}
    write_report(tmp_path, result, summary, current)
    assert (tmp_path / "report.html").stat().st_size > 100_000  # Evidently's self-contained HTML
    summary_read, current_read = read_report(tmp_path)
    assert summary_read == summary
    assert current_read.equals(current)
