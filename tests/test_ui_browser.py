"""The real Dagster web UI in a real browser shows the whole lifecycle as one asset graph.

Starts `dagster-webserver` on the checkout's workspace.yaml against a fresh project and drives
Debian's chromium with Playwright (`playwright install` cannot download a browser here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dagster_procs import DagsterProcesses
from helpers import make_project

CHROMIUM = "/usr/bin/chromium"
LIFECYCLE = ("raw_corpus", "clean_corpus", "deduped_shards", "incoming_batch", "tokenizer", "base_checkpoint", "lora_checkpoint",
             "aligned_checkpoint", "quantized_model", "eval_report", "release", "drift_report")
GROUPS = ("data", "tokenizer", "training", "evaluation", "release", "monitoring")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_global_asset_graph_shows_lifecycle(tmp_path: Path, record_property):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    shot_dir = Path(os.environ.get("LLM_ASSETS_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "global_asset_graph.png"
    project = make_project(tmp_path)
    with DagsterProcesses(home=tmp_path / "dagster_home", env={"LLM_ASSETS_PROJECT_DIR": str(project)},
                          log_dir=tmp_path / "logs") as dagster, sync_playwright() as p:
        dagster.wait_ready(timeout=90)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1920, "height": 1200})
        try:
            page.goto(f"{dagster.url}/asset-groups")
            # Names also appear in the sidebar tree: only text inside the graph's svg counts.
            graph = page.locator("svg")
            # With this many assets the global graph opens with every group collapsed into one box.
            expect(graph.get_by_text("training", exact=True)).to_be_visible(timeout=30_000)
            # The UI's own "Expand all groups" shortcut (⌥E); it records the groups in the URL, and a
            # reload lays the expanded graph out zoomed to fit (without it, nodes run off the edge).
            page.keyboard.press("Alt+e")
            expect(graph.get_by_text("drift_report", exact=True)).to_be_visible()
            assert "expanded=" in page.url
            page.reload()
            for name in LIFECYCLE:
                # `tokenizer` and `release` are also the titles of their (expanded) groups.
                matches = graph.get_by_text(name, exact=True)
                expect(matches).to_have_count(2 if name in GROUPS else 1)
                for i in range(matches.count()):
                    expect(matches.nth(i)).to_be_in_viewport()
        finally:
            page.screenshot(path=str(shot))  # also on failure: the picture says what went wrong
            browser.close()
            print(f"screenshot: {shot}")
            record_property("screenshot", str(shot))
