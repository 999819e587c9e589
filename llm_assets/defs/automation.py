"""Sensors and schedules: what starts runs without a person. Nothing here starts pretraining (the
tokenizer and base checkpoint only run when someone asks), and no asset carries an automation
condition, so reloading code never re-runs training.

- incoming_data_sensor: each new file in data/incoming/ -> ingest_job on its own partition (again
  on the next tick if that run failed, up to MAX_INGEST_RUNS runs).
- drift_sensor: a drift_report that found drift -> retrain_job, once per report version.
- drift_report_schedule (daily) and eval_report_schedule (weekly).

Runs they start take their config from $LLM_ASSETS_CONFIG (default configs/demo.yaml), see
`llm_assets.lib.common.run_config`.
"""

import json
import os
from datetime import timedelta

import dagster as dg

from llm_assets.defs.ingestion import incoming_batches, ingested_batches
from llm_assets.defs.jobs import INGEST_ASSETS, RETRAIN_ASSETS, drift_job, evaluation_job, ingest_job, retrain_job
from llm_assets.defs.resources import LakeResource
from llm_assets.lib.data import ingest
from llm_assets.lib.common import run_config
from llm_assets.lib.monitor.serving_log import read_log


def _env_float(name: str, default: float) -> float:
    """Operators tune the cadence per deployment (the end-to-end test runs them fast)."""
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError as e:
        raise ValueError(f"${name} must be a number of seconds, got {raw!r}") from e


SENSOR_INTERVAL_S = int(_env_float("LLM_ASSETS_SENSOR_INTERVAL_S", 30))
SETTLE_S = _env_float("LLM_ASSETS_SETTLE_S", 10)  # a file unchanged this long is completely written
DRIFT_WINDOW_HOURS = 24.0
TAG = "llm_assets"  # tag prefix: llm_assets/cause, llm_assets/drift_report_version, ...
# Runs one batch gets from the sensor: a retry on the next tick rides out a passing failure (a
# concurrent writer, a killed run), while a file that fails every time (malformed JSON) must not
# start a run every tick forever. `llm-assets ingest` still retries it, as a person asks.
MAX_INGEST_RUNS = 3


@dg.sensor(job=ingest_job, minimum_interval_seconds=SENSOR_INTERVAL_S, default_status=dg.DefaultSensorStatus.RUNNING)
def incoming_data_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    """Starts ingest_job for each file dropped into data/incoming/ whose batch (one partition per file
    content) is not ingested yet. The cursor remembers each file's size, mtime and batch key, a run
    key per content guards restarts, and a file that changed in the last LLM_ASSETS_SETTLE_S seconds
    waits for the next tick. A batch whose run failed is taken again on the next tick, up to
    MAX_INGEST_RUNS runs."""
    incoming = lake.paths.incoming
    seen = {name: entry for name, entry in (json.loads(context.cursor) if context.cursor else {}).items()
            if len(entry) == 3}  # [size, mtime_ns, key]; older cursors had no key: hash those again
    ready, settling = ingest.scan(incoming, {name: entry[:2] for name, entry in seen.items()}, SETTLE_S)
    for skipped in ingest.skipped_links(incoming):
        context.log.warning(f"{incoming}/{skipped}")
    for path in ready:
        before = ingest.stamp(path)
        key = ingest.batch_key(path)
        if ingest.stamp(path) != before:  # written to while we hashed it: next tick
            settling.append(path)
            continue
        seen[path.name] = [*before, key]
    # Only files unchanged since they were hashed; a removed file is forgotten.
    now = {p.name: ingest.stamp(p) for p in ingest.candidates(incoming)}
    seen = {name: entry for name, entry in sorted(seen.items()) if now.get(name) == entry[:2]}
    ingested = ingested_batches(context.instance)
    fresh = {p.name for p in ready}
    requests = [r for name, (_, _, key) in seen.items()
                if (r := _ingest_request(context, lake, name, key, name in fresh, ingested))]
    if settling:
        context.log.info(f"waiting for {len(settling)} file(s) still being written: {[p.name for p in settling]}")
    cursor = json.dumps(seen)
    if not requests:
        return dg.SensorResult(skip_reason=f"no new files in {incoming} ({len(settling)} still settling)", cursor=cursor)
    new_keys = [r.partition_key for r in requests
                if not context.instance.has_dynamic_partition(incoming_batches.name, r.partition_key)]
    return dg.SensorResult(run_requests=requests, cursor=cursor,
                           dynamic_partitions_requests=[incoming_batches.build_add_request(new_keys)])


def _ingest_request(context: dg.SensorEvaluationContext, lake: LakeResource, name: str, key: str, fresh: bool,
                    ingested: set[str]) -> dg.RunRequest | None:
    """A run for batch `key` (file `name`, `fresh` if new or changed since the last tick), or None: it
    is ingested, a run of it is queued or running, it was asked for and has not started, or it
    failed MAX_INGEST_RUNS times."""
    if key in ingested:
        if fresh:
            context.log.info(f"{name}: batch {key} was ingested before (same content), not again")
        return None
    runs = context.instance.get_runs(dg.RunsFilter(job_name=ingest_job.name, tags={"dagster/partition": key}))
    if any(not run.is_finished for run in runs) or not (runs or fresh):
        return None
    if len(runs) >= MAX_INGEST_RUNS:
        context.log.warning(f"{name}: batch {key} failed {len(runs)} runs ({', '.join(r.run_id[:8] for r in runs)}), "
                            "not retried: fix the file and drop it again, or run `llm-assets ingest`")
        return None
    return dg.RunRequest(
        # The daemon starts one run per run key: a retry needs a key of its own.
        run_key=f"ingest:{key}" + (f":retry{len(runs)}" if runs else ""), partition_key=key,
        run_config=run_config.for_automation(lake.root, set(INGEST_ASSETS), {"drift_report": {"incoming_batch": key}}),
        tags={f"{TAG}/cause": "incoming_data", f"{TAG}/incoming_file": name})


@dg.sensor(job=retrain_job, minimum_interval_seconds=SENSOR_INTERVAL_S, default_status=dg.DefaultSensorStatus.RUNNING)
def drift_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    """Starts retrain_job for each drift_report materialization that found drift. It reads every
    materialization after its cursor (an asset sensor sees only the latest), and the run key is the
    report's data version: one report never starts two runs. The run's tags name the report."""
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("drift_report"), after_storage_id=after),
        limit=100, ascending=True).records
    requests = []
    for record in records:
        mat = record.asset_materialization
        found = mat.metadata.get("drift_detected")
        if not (found and found.value):
            continue
        version = mat.tags.get("dagster/data_version", str(record.storage_id))
        requests.append(dg.RunRequest(
            run_key=f"retrain:drift_report:{version}",
            run_config=run_config.for_automation(lake.root, set(RETRAIN_ASSETS)),
            tags={f"{TAG}/cause": "drift", f"{TAG}/drift_report_version": version,
                  f"{TAG}/drift_report_run_id": record.run_id,
                  f"{TAG}/drift_source": str(mat.metadata["source"].value) if "source" in mat.metadata else "serving",
                  f"{TAG}/drifted_columns": str(mat.metadata["drifted_columns"].value)[:200]
                  if "drifted_columns" in mat.metadata else ""}))
    cursor = str(records[-1].storage_id) if records else context.cursor
    if not requests:
        return dg.SensorResult(skip_reason=f"{len(records)} new drift report(s), none found drift", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


@dg.schedule(job=drift_job, cron_schedule="0 6 * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def drift_report_schedule(context: dg.ScheduleEvaluationContext, lake: LakeResource):
    """Daily at 06:00 UTC: drift of the last day of serving traffic; skipped when the day had fewer
    requests than the report needs (a report on a handful of requests would mean nothing)."""
    cfg = run_config.for_automation(lake.root, {"drift_report"},
                                    {"drift_report": {"window_hours": DRIFT_WINDOW_HOURS, "incoming_batch": ""}})
    need = cfg["ops"]["drift_report"]["config"].get("min_current_rows", _default_min_rows())
    since = context.scheduled_execution_time - timedelta(hours=DRIFT_WINDOW_HOURS)
    rows = read_log(lake.paths.serving, since=since).num_rows
    if rows < need:
        return dg.SkipReason(f"{rows} requests since {since.isoformat()} (< min_current_rows {need})")
    return dg.RunRequest(run_config=cfg, tags={f"{TAG}/cause": "schedule", f"{TAG}/window_requests": str(rows)})


@dg.schedule(job=evaluation_job, cron_schedule="0 7 * * 1", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def eval_report_schedule(context: dg.ScheduleEvaluationContext, lake: LakeResource):
    """Mondays at 07:00 UTC: every checkpoint evaluated again on the current held-out data
    (skipped until there is a quantized model to evaluate)."""
    if context.instance.get_latest_materialization_event(dg.AssetKey("quantized_model")) is None:
        return dg.SkipReason("no quantized_model materialized yet: materialize the graph first")
    return dg.RunRequest(run_config=run_config.for_automation(lake.root, {"eval_report"}),
                         tags={f"{TAG}/cause": "schedule"})


def _default_min_rows() -> int:
    from llm_assets.defs.monitoring import DriftReportConfig

    return DriftReportConfig.model_fields["min_current_rows"].default
