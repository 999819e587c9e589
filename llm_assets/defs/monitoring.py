"""Group `monitoring`: serving_log (the server's request log, observed) and drift_report (Evidently:
recent traffic against the prompts the model was trained on)."""

import hashlib
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import dedup, ingest
from llm_assets.lib.monitor import drift
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.release.release import current_release
from llm_assets.lib.common.report import markdown_table
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.monitor import serving_log as log_lib

if TYPE_CHECKING:
    import pandas as pd


@dg.observable_source_asset(group_name="monitoring", description=(
    "Every request `llm-assets serve` answered (time, prompt, response, token counts, latency, model "
    "version), as Parquet parts under data/serving/. Observed: the data version changes when new parts arrive."))
def serving_log(lake: LakeResource) -> dg.ObserveResult:
    directory = lake.paths.serving
    parts = log_lib.parts(directory)
    h = hashlib.blake2b(digest_size=12)
    for p in parts:  # parts are write-once: names and sizes identify the log's content
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    rows = log_lib.read_log(directory).num_rows
    return dg.ObserveResult(data_version=dg.DataVersion(h.hexdigest()),
                            metadata={"parts": len(parts), "requests": rows, "path": dg.MetadataValue.path(str(directory))})


class DriftReportConfig(dg.Config, drift.DriftSettings):
    """The drift rules of lib/monitor/drift.py plus what drift_report compares."""

    incoming_batch: str = Field("", description="An incoming_batch partition key: compare that batch's documents with the training corpus instead of serving traffic with the training prompts (set by incoming_data_sensor).")
    window_hours: float = Field(24.0, ge=0, description="Current window: serving traffic of the last this many hours (0 = all of it).")
    min_current_rows: int = Field(20, ge=1, description="Fewer rows than this (requests in the window, documents in the batch): no report, the step is skipped saying why (the comparison would mean nothing).")
    max_reference_rows: int = Field(2000, ge=50, description="Training prompts sampled as the reference.")
    use_model_perplexity: bool = Field(True, description="Add each text's perplexity under the released model as a descriptor (needs a release).")
    model_version: str = Field("", description="Only the serving traffic this model version answered (the serving log's model_version); empty: all of it, and while the release pointer names a canary, the release's and the canary's traffic are also reported side by side.")


def _released_model(lake: LakeResource):
    release = current_release(lake.paths.releases)
    if release is None:
        return None, None, None
    from transformers import AutoTokenizer

    from llm_assets.lib.release.quantize import load_for_inference

    return load_for_inference(release["path"]), AutoTokenizer.from_pretrained(release["path"]), release["version"]


# output_required=False: too few rows to compare is no report, not a failure (a small batch is still
# ingested); the step then records an observation saying why, and the previous report stays.
@dg.asset(group_name="monitoring", kinds={"evidently", "dvc"}, deps=["serving_log", "sft_dataset", "incoming_batch"],
          output_required=False)
def drift_report(context: dg.AssetExecutionContext, config: DriftReportConfig, lake: LakeResource):
    """Evidently data drift between what the model meets now and what it was trained on: by default
    the prompts served in the window against the instruction prompts of sft_dataset; with
    `incoming_batch` set, a newly ingested batch against the training corpus. Text drift plus
    descriptors (length, words, non-letter share, byte-fallback rate, perplexity under the released
    model). `report.html` is Evidently's report, `summary.json` the figures in metadata; a report that
    finds drift starts retrain_job (drift_sensor). Fewer than `min_current_rows` rows: skipped, and
    an observation of drift_report says why (metadata `skipped`)."""
    if config.incoming_batch:
        source = f"incoming_batch:{config.incoming_batch}"
        current_texts, reference_texts, window = _batch_window(lake, config.incoming_batch)
    else:
        source = f"serving:{config.model_version}" if config.model_version else "serving"
        current_texts, reference_texts, window, versions = _serving_window(lake, config.window_hours, config.model_version)
    if len(current_texts) < config.min_current_rows:
        unit = "documents in the batch" if config.incoming_batch else "requests in the window"
        reason = (f"only {len(current_texts)} {unit} ({source}, {window}); "
                  f"min_current_rows is {config.min_current_rows}")
        context.log.warning(f"drift_report skipped: {reason}")
        yield dg.AssetObservation(asset_key="drift_report", metadata={
            "skipped": reason, "source": source, "current_rows": len(current_texts),
            "min_current_rows": config.min_current_rows})
        return
    model, tokenizer, version = _released_model(lake) if config.use_model_perplexity else (None, None, None)
    if tokenizer is None:
        from llm_assets.lib.tokenizer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(lake.artifact_dir("tokenizer"))
        if config.use_model_perplexity:
            context.log.warning("no release to score perplexity with: the report leaves that descriptor out")
    reference_texts = drift.sample(reference_texts, config.max_reference_rows)
    reference = drift.describe(reference_texts, tokenizer, model)
    current = drift.describe(current_texts, tokenizer, model)
    result = drift.detect_drift(reference, current, settings_of(config, drift.DriftSettings))
    s = {**result.summary, "source": source, "window": window, "model_version": version}
    if not config.incoming_batch and not config.model_version:
        s["by_version"] = _release_and_canary(lake, reference, current, versions, config)
    out = lake.artifact_dir("drift_report")
    with lake.write("drift_report") as tmp:
        drift.write_report(tmp, result, s, current)
    version_ = lake.record("drift_report")
    rows = [(col, f"{v['score']:.4g}", v["method"], v["threshold"], "yes" if col in s["drifted_columns"] else "no")
            for col, v in s["scores"].items()]
    yield dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version_),
            "drift_detected": s["drift_detected"],
            "drift_share": s["drift_share"],
            "drifted_columns": ", ".join(s["drifted_columns"]) or "none",
            "current_rows": s["current_rows"],
            "reference_rows": s["reference_rows"],
            "source": source,
            "window": window,
            "report": dg.MetadataValue.path(str(out / drift.REPORT_HTML)),
            "columns": dg.MetadataValue.md(markdown_table(["column", "score", "method", "threshold", "drifted"], rows)),
            **_by_version_metadata(s.get("by_version") or {}),
        },
        data_version=dg.DataVersion(version_.md5),
    )


def _serving_window(lake: LakeResource, window_hours: float, version: str) -> tuple[list[str], list[str], str, list[str]]:
    """Prompts served in the window (by `version` only, when given), the training prompts, the
    window in words, and the version that answered each prompt."""
    since = datetime.now(timezone.utc) - timedelta(hours=window_hours) if window_hours else None
    log = log_lib.read_log(lake.paths.serving, since=since).to_pandas()
    if version:
        log = log[log["model_version"] == version]
    window = (f"{log['time'].min().isoformat()} .. {log['time'].max().isoformat()}" if len(log)
              else f"no requests in the last {window_hours} h" + (f" answered by {version}" if version else ""))
    chats = posttrain_data.read_chats(lake.artifact_dir("sft_dataset"), "train")
    return log["prompt"].tolist(), posttrain_data.user_prompts(chats), window, log["model_version"].tolist()


def _release_and_canary(lake: LakeResource, reference: "pd.DataFrame", current: "pd.DataFrame", versions: list[str],
                        config: DriftReportConfig) -> dict:
    """While the release pointer names a canary: the release's and the canary's traffic, each against
    the reference (figures for a version with at least min_current_rows rows, else its row count)."""
    pointer = current_release(lake.paths.releases)
    if not pointer or not pointer.get("canary"):
        return {}
    out = {}
    for version, route in ((pointer["version"], "release"), (pointer["canary"]["version"], "canary")):
        rows = current[[v == version for v in versions]].reset_index(drop=True)
        out[version] = {"route": route, "current_rows": len(rows)}
        if len(rows) >= config.min_current_rows:
            summary = drift.detect_drift(reference, rows, settings_of(config, drift.DriftSettings)).summary
            out[version].update({k: summary[k] for k in ("drift_detected", "drift_share", "drifted_columns")})
    return out


def _by_version_metadata(by_version: dict) -> dict:
    """The release's and the canary's figures side by side: a table, and numbers the UI can chart."""
    if not by_version:
        return {}
    rows = [(v, f["route"], f["current_rows"], f.get("drift_detected", "too few rows"), f.get("drift_share", ""),
             ", ".join(f.get("drifted_columns", [])) or "none") for v, f in by_version.items()]
    flat = {f"{f['route']}_{key}": f[key] for f in by_version.values()
            for key in ("current_rows", "drift_detected", "drift_share") if key in f}
    canary = next(v for v, f in by_version.items() if f["route"] == "canary")
    return {**flat, "canary_version": canary, "by_version": dg.MetadataValue.md(markdown_table(
        ["model version", "route", "rows", "drift detected", "drift share", "drifted columns"], rows))}


def _batch_window(lake: LakeResource, key: str) -> tuple[list[str], list[str], str]:
    batch = lake.artifact_dir("incoming_batch") / key
    if not ingest.is_batch(batch):
        raise dg.Failure(description=f"incoming batch {key!r} is not ingested ({batch} missing): materialize incoming_batch[{key}] first")
    info, documents = ingest.read_batch(batch)
    current = documents.column("text").to_pylist()
    reference = dedup.read_split(lake.artifact_dir("deduped_shards"), "train").column("text").to_pylist()
    return current, reference, f"batch {key} ({info['file']})"
