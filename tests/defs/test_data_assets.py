"""In-process materialization of the data group on a throwaway project with real DVC."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from llm_assets.defs.data import clean_corpus, deduped_shards, raw_corpus

from helpers import lock_md5, materialize_assets

ASSETS = [raw_corpus, clean_corpus, deduped_shards]


def test_data_group_materializes_with_metadata_and_dvc_versions(project, tiny_run_config):
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_assets(ASSETS, project, tiny_run_config, instance=instance)
        assert result.success
        for asset in ("raw_corpus", "clean_corpus", "deduped_shards"):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            md = event.asset_materialization.metadata
            assert md["dvc_md5"].value == lock_md5(project, asset)
            assert event.asset_materialization.tags["dagster/data_version"] == md["dvc_md5"].value
            assert Path(md["path"].value) == project / "data" / "lake" / asset
            assert md["bytes"].value > 0
    raw = result.asset_materializations_for_node("raw_corpus")[0].metadata
    dedup = result.asset_materializations_for_node("deduped_shards")[0].metadata
    assert raw["documents"].value == 240
    assert dedup["documents_in"].value + dedup["documents"].value > 0
    assert dedup["duplicate_rate"].value == pytest.approx(
        (dedup["exact_duplicates"].value + dedup["near_duplicates"].value) / dedup["documents_in"].value)
    assert dedup["train_documents"].value > 0 and dedup["validation_documents"].value > 0
    assert "| split |" in dedup["splits"].value
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["deduped_shards_splits_disjoint"] is True
    manifest = json.loads((project / "data/lake/deduped_shards/manifest.json").read_text())
    shard = pq.read_table(project / "data/lake/deduped_shards" / manifest["shards"][0]["file"])
    assert shard.column_names == ["doc_id", "source", "text", "cluster_size"]
    # the DVC remote holds the pushed objects
    assert any((project.parent / "remote").rglob("*.dir"))


def test_malformed_jsonl_fails_with_file_and_line_and_keeps_previous_artifact(project):
    cfg = {"ops": {"raw_corpus": {"config": {"include_stdlib": False}}}}
    (project / "data/raw/good.jsonl").write_text('{"text": "a fine document"}\n')
    assert materialize_assets(ASSETS, project, cfg, selection=[raw_corpus]).success
    before = (project / "data/lake/raw_corpus/corpus.parquet").read_bytes()

    (project / "data/raw/bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    result = materialize_assets(ASSETS, project, cfg, selection=[raw_corpus])
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    assert "bad.jsonl:2: invalid JSON" in error.to_string()
    assert (project / "data/lake/raw_corpus/corpus.parquet").read_bytes() == before
    # no staging left (the writer locks live in .locks)
    assert sorted(p.name for p in (project / "data/lake").iterdir()) == [".locks", "raw_corpus"]


def test_a_few_jsonl_lines_without_text_are_counted_not_fatal(project):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(30)] + [json.dumps({"body": "no text"})]
    (project / "data/raw/rows.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"ops": {"raw_corpus": {"config": {"include_stdlib": False}}}}
    result = materialize_assets(ASSETS, project, cfg, selection=[raw_corpus])
    assert result.success
    md = {k: v.value for k, v in result.asset_materializations_for_node("raw_corpus")[0].metadata.items()}
    assert md["documents"] == 30 and md["dropped_bad_records"] == 1 and md["bad_record_share"] == pytest.approx(1 / 31)
    assert "| missing_field | 1 | rows.jsonl:31 |" in md["bad_records"]
    cfg["ops"]["raw_corpus"]["config"]["max_bad_record_share"] = 0.01
    failed = materialize_assets(ASSETS, project, cfg, selection=[raw_corpus])
    error = failed.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "rows.jsonl: 1 of 31 records unusable (3.2% > max_bad_record_share 1.0%): missing_field 1" in error


def test_no_documents_left_fails_clearly(project):
    (project / "data/raw/short.txt").write_text("too short to keep")
    cfg = {"ops": {"raw_corpus": {"config": {"include_stdlib": False}}}}
    result = materialize_assets(ASSETS, project, cfg, selection=[raw_corpus, clean_corpus])
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "no documents left after cleaning (1 in; removed by too_short: 1)" in error
    assert not (project / "data/lake/clean_corpus").exists()


def test_a_one_document_corpus_is_split_by_paragraph_and_passes_the_gate(project):
    """Too few documents for the cluster split: the metadata says which grain was used and why."""
    paras = [f"Paragraph {i}: " + " ".join(f"notion{(i * 7 + j) % 97}" for j in range(40)) for i in range(12)]
    (project / "data/raw/notes.txt").write_text("\n\n".join(paras))
    cfg = {"ops": {"raw_corpus": {"config": {"include_stdlib": False}},
                   "deduped_shards": {"config": {"validation_fraction": 0.2}}}}
    result = materialize_assets(ASSETS, project, cfg)
    assert result.success
    md = result.asset_materializations_for_node("deduped_shards")[0].metadata
    assert md["split_grain"].value == "paragraph" and "raw/notes.txt" in md["split_reason"].value
    assert md["validation_documents"].value >= 1 and md["train_documents"].value >= 8
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "deduped_shards_splits_disjoint")
    assert check.passed and check.metadata["split_grain"].value == "paragraph"
    manifest = json.loads((project / "data/lake/deduped_shards/manifest.json").read_text())
    assert manifest["split"]["grain"] == "paragraph"


def test_a_corpus_that_cannot_be_split_fails_saying_how_many_documents_to_add(project):
    (project / "data/raw/word.txt").write_text("x" * 300)  # passes cleaning, but is one 300-letter word
    cfg = {"ops": {"raw_corpus": {"config": {"include_stdlib": False}}}}
    result = materialize_assets(ASSETS, project, cfg)
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "needs at least 2 documents" in error and "add at least 1 more document" in error
    assert not (project / "data/lake/deduped_shards").exists()
