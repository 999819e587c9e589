"""serving_log (observed) and drift_report on the tiny config, with a request log written here."""

import shutil
import sysconfig
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.observe import observe  # the test-side twin of an observation tick

from helpers import lock_md5, log_prompts, materialize, metadata
from llm_assets.defs.monitoring import serving_log
from llm_assets.defs.resources import LakeResource
from llm_assets.lib.monitor.drift import read_summary
from llm_assets.lib.posttrain.posttrain_data import read_chats, user_prompts
from llm_assets.lib.release.release import Gate, publish

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


def test_drift_report_of_one_version_and_the_canary_beside_the_release(project, tiny_config, tmp_path):
    root, instance = project
    for v in ("v1", "v2"):  # a release and its canary; perplexity is off, so the copies need no weights
        (tmp_path / v).mkdir()
        (tmp_path / v / "config.json").write_text("{}")
        publish(tmp_path / v, root / "data/releases", v, [Gate("g", True, 0, 0)], {}, canary_share=0.3)
    licence = [" ".join(p.split())[:300] for p in (STDLIB / "LICENSE.txt").read_text().split("\n\n") if len(p.split()) >= 8]
    trained = user_prompts(read_chats(root / "data/lake/sft_dataset", "train"))
    log_prompts(root, trained[1:40:3], version="v1")  # the release meets training-like traffic
    log_prompts(root, licence[:9], version="v2")     # the canary meets another domain
    try:
        cfg = tiny_config(["drift_report"])
        cfg["ops"]["drift_report"]["config"].update(use_model_perplexity=False, model_version="v2")
        assert materialize(root, cfg, ["drift_report"], instance).success
        md = metadata(instance, "drift_report")
        assert md["source"] == "serving:v2" and md["current_rows"] == 9 and md["drift_detected"] is True
        assert "by_version" not in md

        cfg["ops"]["drift_report"]["config"]["model_version"] = ""
        assert materialize(root, cfg, ["drift_report"], instance).success
        md = metadata(instance, "drift_report")
        assert (md["release_current_rows"], md["canary_current_rows"], md["canary_version"]) == (13, 9, "v2")
        assert md["canary_drift_detected"] is True and md["release_drift_detected"] is False
        assert "| v2 | canary | 9 | True |" in md["by_version"] and "| v1 | release | 13 | False |" in md["by_version"]
        by_version = read_summary(root / "data/lake/drift_report")["by_version"]
        assert by_version["v2"]["route"] == "canary" and by_version["v2"]["drift_detected"] is True
    finally:
        shutil.rmtree(root / "data/releases")  # the other tests score perplexity with the release
