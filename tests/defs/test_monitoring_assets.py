"""serving_log (observed) and drift_report on the tiny config, with a request log written here."""

import sysconfig
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.observe import observe  # the test-side twin of an observation tick

from helpers import lock_md5, log_prompts, materialize, metadata
from llm_assets.defs.monitoring import serving_log
from llm_assets.defs.resources import LakeResource
from llm_assets.lib.posttrain.posttrain_data import read_chats, user_prompts

STDLIB = Path(sysconfig.get_paths()["stdlib"])
UPSTREAM = ["raw_corpus", "clean_corpus", "deduped_shards", "tokenizer", "sft_dataset"]


@pytest.fixture(scope="module")
def project(project_factory, tiny_config):
    project = project_factory("monitoring")
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(project, tiny_config(UPSTREAM), UPSTREAM, instance).success
    return project, instance


def data_version(project, instance) -> str:
    observe([serving_log], instance=instance, resources={"lake": LakeResource(project_dir=str(project))})
    record = instance.get_latest_data_version_record(dg.AssetKey("serving_log"))
    return record.asset_observation.data_version


def test_serving_log_version_changes_when_requests_arrive(project):
    root, instance = project
    empty = data_version(root, instance)
    assert data_version(root, instance) == empty  # nothing new, same version
    log_prompts(root, ["hello"])
    assert data_version(root, instance) != empty


def test_drift_report_flags_another_domain_and_saves_html(project, tiny_config):
    root, instance = project
    licence = [" ".join(p.split())[:300] for p in (STDLIB / "LICENSE.txt").read_text().split("\n\n") if len(p.split()) >= 8]
    log_prompts(root, licence[:60])
    cfg = tiny_config(["drift_report"])
    result = materialize(root, cfg, ["drift_report"], instance)
    assert result.success
    md = metadata(instance, "drift_report")
    assert md["drift_detected"] is True and "text" in md["drifted_columns"]
    assert md["current_rows"] == 1 + len(licence[:60]) and md["reference_rows"] == 200
    assert (root / "data/lake/drift_report/report.html").stat().st_size > 100_000  # Evidently's self-contained HTML
    assert "| text |" in md["columns"]
    assert lock_md5(root, "drift_report") == md["dvc_md5"]


def test_drift_report_on_training_like_traffic_and_too_little_traffic(project_factory, tiny_config):
    root = project_factory("monitoring-quiet")
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(root, tiny_config(UPSTREAM), UPSTREAM, instance).success
    log_prompts(root, ["hi"])
    result = materialize(root, tiny_config(["drift_report"]), ["drift_report"], instance)
    assert result.success and not result.get_asset_materialization_events()  # skipped: no report, no failure
    [skipped] = [e.asset_observation_data.asset_observation for e in result.get_asset_observation_events()]
    assert skipped.metadata["skipped"].value.startswith("only 1 requests in the window")
    assert not (root / "data/lake/drift_report").exists()

    # traffic like training: prompts drawn from the training chats (held-out modules' prompts are a
    # different distribution of names and lengths, and are flagged: see the README)
    trained = user_prompts(read_chats(root / "data/lake/sft_dataset", "train"))
    log_prompts(root, trained[1::3])
    assert materialize(root, tiny_config(["drift_report"]), ["drift_report"], instance).success
    md = metadata(instance, "drift_report")
    assert md["drift_detected"] is False, md["drifted_columns"]
