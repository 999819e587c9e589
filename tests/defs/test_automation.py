"""Sensors and schedules through Dagster's test contexts, on a tiny materialized project: first tick,
nothing new, new input, a repeated report, a failed batch taken again; and the ingest runs they
start, for real."""

import json
import os
import time
from datetime import datetime, timezone

import dagster as dg
import pytest

from helpers import log_prompts, materialize, metadata, shifted_batch
from llm_assets.definitions import defs
from llm_assets.defs.automation import (MAX_INGEST_RUNS, drift_report_schedule, drift_sensor, eval_report_schedule,
                                        incoming_data_sensor)
from llm_assets.defs.ingestion import ingested_batches
from llm_assets.defs.resources import LakeResource
from llm_assets.lib.common.paths import ProjectPaths
from llm_assets.lib.common.writer_lock import WriterLocks
from llm_assets.lib.posttrain.posttrain_data import read_chats, user_prompts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UPSTREAM = ["raw_corpus", "clean_corpus", "deduped_shards", "tokenizer", "sft_dataset"]
TRAINING = {"raw_corpus", "clean_corpus", "deduped_shards", "tokenizer", "tokenized_shards", "base_checkpoint"}


@pytest.fixture(scope="module")
def env(project_factory, tiny_config):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_ASSETS_CONFIG", os.path.join(REPO, "configs", "tiny.yaml"))  # what runs they start use
        project = project_factory("automation")
        instance = dg.DagsterInstance.ephemeral()
        assert materialize(project, tiny_config(UPSTREAM), UPSTREAM, instance).success
        yield project, instance


def tick(sensor, project, instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"lake": LakeResource(project_dir=str(project))}) as ctx:
        return sensor(ctx)


def drop(project, name: str, text: str, age_s: float = 60):
    path = project / "data" / "incoming" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_incoming_sensor_first_tick_nothing_new_new_file_and_half_written(env):
    project, instance = env
    first = tick(incoming_data_sensor, project, instance)
    assert not first.run_requests and "no new files" in first.skip_reason.skip_message
    drop(project, "batch.jsonl", shifted_batch(), age_s=0)  # just written: may still be growing
    settling = tick(incoming_data_sensor, project, instance, first.cursor)
    assert not settling.run_requests and "1 still settling" in settling.skip_reason.skip_message
    path = drop(project, "batch.jsonl", shifted_batch())
    new = tick(incoming_data_sensor, project, instance, settling.cursor)
    [request] = new.run_requests
    key = request.partition_key
    assert key.startswith("batch.jsonl-") and request.run_key == f"ingest:{key}"
    assert request.run_config["ops"]["drift_report"]["config"]["incoming_batch"] == key
    assert request.run_config["ops"]["drift_report"]["config"]["min_current_rows"] == 5  # from $LLM_ASSETS_CONFIG
    assert new.dynamic_partitions_requests[0].partition_keys == [key]
    assert json.loads(new.cursor) == {"batch.jsonl": [path.stat().st_size, path.stat().st_mtime_ns, key]}
    again = tick(incoming_data_sensor, project, instance, new.cursor)
    assert not again.run_requests  # nothing new: the file is in the cursor, its run not started yet
    # The same content dropped again (new mtime) asks for the same run key: the daemon starts one run.
    os.utime(path, (time.time() - 30, time.time() - 30))
    [repeat] = tick(incoming_data_sensor, project, instance, new.cursor).run_requests
    assert repeat.run_key == request.run_key
    path.unlink()  # never ingested: later tests' first ticks would take it


def test_incoming_sensor_never_reads_a_symlink(env, tmp_path):
    project, instance = env
    secret = tmp_path / "passwd.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    link = project / "data" / "incoming" / "passwd.txt"
    link.parent.mkdir(exist_ok=True)
    before = tick(incoming_data_sensor, project, instance)  # what earlier tests dropped is now seen
    link.symlink_to(secret)
    try:
        result = tick(incoming_data_sensor, project, instance, before.cursor)
        assert not result.run_requests and "passwd.txt" not in result.cursor
    finally:
        link.unlink()


def test_ingest_run_reports_drift_and_the_drift_sensor_starts_one_retrain(env):
    project, instance = env
    path = drop(project, "shifted.jsonl", shifted_batch())
    [request] = tick(incoming_data_sensor, project, instance).run_requests
    key = request.partition_key
    result = run_ingest(project, instance, request)
    assert result.success
    os.utime(path, (time.time() - 30, time.time() - 30))  # dropped again: ingested, so nothing starts
    assert not tick(incoming_data_sensor, project, instance).run_requests
    batch = metadata(instance, "incoming_batch")
    assert batch["documents_in"] == 40 and 0 < batch["documents"] <= 40
    assert batch["file"] == str(path)
    report = metadata(instance, "drift_report")
    assert report["drift_detected"] is True and report["source"] == f"incoming_batch:{key}"
    assert "text" in report["drifted_columns"]

    first = tick(drift_sensor, project, instance)
    [retrain] = first.run_requests
    version = instance.get_latest_materialization_event(dg.AssetKey("drift_report")).asset_materialization.tags[
        "dagster/data_version"]
    assert retrain.run_key == f"retrain:drift_report:{version}"
    assert retrain.tags["llm_assets/drift_report_run_id"] == result.run_id
    assert retrain.tags["llm_assets/drift_source"] == f"incoming_batch:{key}"
    assert set(retrain.run_config["ops"]) <= {"sft_dataset", "preference_dataset", "lora_checkpoint",
                                              "aligned_checkpoint", "reward_model", "quantized_model", "eval_report",
                                              "release"}
    assert not tick(drift_sensor, project, instance, first.cursor).run_requests  # nothing new
    # The same report seen again (cursor lost) asks with the same run key: the daemon starts one run.
    assert tick(drift_sensor, project, instance).run_requests[0].run_key == retrain.run_key

    # New input that does not drift (traffic like the training prompts) starts nothing.
    prompts = user_prompts(read_chats(project / "data/lake/sft_dataset", "train"))
    log_prompts(project, prompts[:60])
    cfg = {"ops": {"drift_report": {"config": {"min_current_rows": 5, "max_reference_rows": 200}}}}
    assert materialize(project, cfg, ["drift_report"], instance).success
    assert metadata(instance, "drift_report")["drift_detected"] is False
    calm = tick(drift_sensor, project, instance, first.cursor)
    assert not calm.run_requests and "none found drift" in calm.skip_reason.skip_message

    # The retrain's first step sees the batch: its modules became instruction pairs.
    assert materialize(project, {"ops": {"sft_dataset": {"config": {"max_corpus_pairs": 200}}}},
                       ["sft_dataset"], instance).success
    sft = metadata(instance, "sft_dataset")
    assert sft["incoming_batch_documents"] == batch["documents"]
    assert "| incoming |" in sft["by_origin"]


def test_a_batch_the_corpus_already_has_is_ingested_and_its_drift_report_skipped_saying_why(env):
    project, instance = env
    drop(project, "small.jsonl", shifted_batch(3))
    [request] = tick(incoming_data_sensor, project, instance).run_requests
    result = run_ingest(project, instance, request)
    assert result.success
    batch = metadata(instance, "incoming_batch")
    # the three modules came with the earlier shifted.jsonl batch: exact duplicates, nothing new
    assert batch["documents"] == 0 and batch["duplicates_of_corpus_or_batch"] == 3
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "incoming_batch_adds_documents"]
    assert not check.passed  # a warning, not a failure
    # fewer documents than min_current_rows (5): no report, the previous one stays, the run says why
    assert instance.get_latest_materialization_event(dg.AssetKey("drift_report")).run_id != result.run_id
    [skipped] = [e.asset_observation_data.asset_observation for e in result.get_asset_observation_events()]
    assert skipped.asset_key == dg.AssetKey("drift_report")
    assert skipped.metadata["skipped"].value.startswith("only 0 documents in the batch")
    assert "min_current_rows is 5" in skipped.metadata["skipped"].value
    assert request.partition_key in ingested_batches(instance)


def test_a_batch_whose_run_failed_is_taken_again_on_the_next_tick(env):
    project, instance = env
    path = drop(project, "retry.jsonl", shifted_batch(2))
    first = tick(incoming_data_sensor, project, instance)
    [request] = first.run_requests
    key = request.partition_key
    other = WriterLocks(ProjectPaths(project).locks, "run 0123abcd")  # another run writing incoming_batch
    other.hold("incoming_batch")
    try:
        failed = run_ingest(project, instance, request)
    finally:
        other.release_all()
    assert not failed.success and key not in ingested_batches(instance)
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "incoming_batch is being written by run 0123abcd" in failure.step_failure_data.error.to_string()
    retry = tick(incoming_data_sensor, project, instance, first.cursor)
    [again] = retry.run_requests
    assert again.partition_key == key and again.run_key == f"ingest:{key}:retry1"
    assert run_ingest(project, instance, again).success
    assert not tick(incoming_data_sensor, project, instance, retry.cursor).run_requests
    path.unlink()


def test_a_batch_that_fails_every_time_is_given_up_after_three_runs(env):
    project, instance = env
    path = drop(project, "broken.jsonl", "{not json}\n")
    cursor, keys = None, []
    for _ in range(MAX_INGEST_RUNS):
        result = tick(incoming_data_sensor, project, instance, cursor)
        [request] = result.run_requests
        keys.append(request.run_key)
        assert not run_ingest(project, instance, request).success
        cursor = result.cursor
    key = request.partition_key
    assert keys == [f"ingest:{key}", f"ingest:{key}:retry1", f"ingest:{key}:retry2"]
    assert not tick(incoming_data_sensor, project, instance, cursor).run_requests
    path.unlink()


def run_ingest(project, instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """What the daemon does with a request of incoming_data_sensor: add the partition, run ingest_job."""
    instance.add_dynamic_partitions("incoming_batches", [request.partition_key])
    run_config = {**request.run_config, "resources": {"lake": {"config": {"project_dir": str(project)}}}}
    return defs().resolve_job_def("ingest_job").execute_in_process(
        run_config=run_config, instance=instance, partition_key=request.partition_key, tags=request.tags,
        raise_on_error=False)


def schedule_tick(schedule, project, instance):
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime.now(timezone.utc),
                                   resources={"lake": LakeResource(project_dir=str(project))}) as ctx:
        return schedule(ctx)


def test_schedules_skip_until_there_is_something_to_do(env, tmp_path):
    project, instance = env
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    skipped = schedule_tick(drift_report_schedule, empty, instance)
    assert isinstance(skipped, dg.SkipReason) and "0 requests" in skipped.skip_message
    log_prompts(empty, ["def f(): pass"] * 6)  # tiny config: min_current_rows 5
    request = schedule_tick(drift_report_schedule, empty, instance)
    config = request.run_config["ops"]["drift_report"]["config"]
    assert config["window_hours"] == 24 and config["incoming_batch"] == "" and config["min_current_rows"] == 5

    with dg.instance_for_test() as fresh:  # schedule contexts need an instance with a ref (not ephemeral)
        assert isinstance(schedule_tick(eval_report_schedule, project, fresh), dg.SkipReason)
        fresh.report_runless_asset_event(dg.AssetMaterialization("quantized_model"))
        request = schedule_tick(eval_report_schedule, project, fresh)
        assert set(request.run_config["ops"]) == {"eval_report"}


def test_automation_never_starts_pretraining_and_no_asset_runs_by_itself():
    d = defs()
    graph = d.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).automation_condition is None, key  # a code reload re-runs nothing
    names = {s.name: s for s in d.sensors} | {s.name: s for s in d.schedules}
    assert set(names) == {"incoming_data_sensor", "drift_sensor", "drift_report_schedule", "eval_report_schedule"}
    for target in names.values():
        job = d.resolve_job_def(target.job_name)
        assets = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
        assert not assets & TRAINING, (target.name, assets & TRAINING)
    assert d.sensors[0].default_status == dg.DefaultSensorStatus.RUNNING


def test_ingestion_and_training_runs_queue_one_at_a_time(tmp_path):
    from llm_assets.cli import DAGSTER_YAML

    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML)  # what `llm-assets init` writes
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {(x["value"], x["limit"]) for x in limits if x["key"] == "llm_assets/lane"} == {("ingest", 1), ("training", 1)}
    d = defs()
    for job, lane in (("ingest_job", "ingest"), ("retrain_job", "training"), ("posttrain_job", "training"),
                      ("pretrain_job", "training")):
        assert d.resolve_job_def(job).tags["llm_assets/lane"] == lane
