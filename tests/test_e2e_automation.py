"""The loop closed by the real processes: `dagster-daemon` and `dagster-webserver` on loopback, a
shifted batch dropped into data/incoming/, and everything observed through the webserver's GraphQL
API: the ingestion run, its drift report, the retrain run that report caused, the release moving.
Prints how long each step took after the drop (the figures the issue asks for)."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from dagster_procs import DagsterProcesses
from helpers import load_tiny_config, make_project, shifted_batch
from llm_assets.cli import DAGSTER_YAML

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RUNS = """query($key: String!, $value: String!) { runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
  ... on Runs { results { runId jobName status creationTime startTime endTime tags { key value } } } } }"""
LATEST = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
  assetMaterializations(limit: 1) { runId metadataEntries { label __typename
    ... on BoolMetadataEntry { boolValue } ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } } } } } }"""
STEPS = """query($runId: ID!) { runOrError(runId: $runId) { ... on Run { stepStats { stepKey status } } } }"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def e2e_config() -> dict:
    """The tiny config, with the default gates: the first model and the retrained one must each pass
    them for the release to move."""
    cfg = load_tiny_config()
    # Six steps at the default rate move a tiny adapter so little (Adam's first steps are about
    # lr * sign(gradient), alike for any data) that the nf4-quantized model comes out byte-identical
    # after a retrain; this many steps at this rate make new data show in the released weights.
    cfg["ops"]["lora_checkpoint"]["config"].update(max_steps=20, lr=5e-3, max_len=192)
    return cfg


def wait_for(what: str, fn, timeout: float, dagster: DagsterProcesses, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s\n{dagster.logs(6000)}")


def runs(dagster: DagsterProcesses, key: str, value: str) -> list[dict]:
    return dagster.graphql(RUNS, {"key": key, "value": value})["runsOrError"]["results"]


def finished(dagster: DagsterProcesses, key: str, value: str):
    found = runs(dagster, key, value)
    return found[0] if found and found[0]["status"] in TERMINAL else None


def latest_metadata(dagster: DagsterProcesses, asset: str) -> tuple[str, dict]:
    [mat] = dagster.graphql(LATEST, {"path": [asset]})["assetOrError"]["assetMaterializations"]
    return mat["runId"], {e["label"]: next((e[k] for k in ("boolValue", "text", "intValue") if k in e), None)
                         for e in mat["metadataEntries"]}


@pytest.fixture(scope="module")
def closed_loop(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    project = make_project(base)
    (project / "configs").mkdir()
    (project / "configs" / "e2e.yaml").write_text(yaml.safe_dump(e2e_config()))
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = {"LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(home), "LLM_ASSETS_CONFIG": "configs/e2e.yaml",
           "LLM_ASSETS_SENSOR_INTERVAL_S": "5", "LLM_ASSETS_SETTLE_S": "2"}
    # The first model and release, through the same instance the daemon will use.
    cli = [sys.executable, "-m", "llm_assets.cli"]
    first = subprocess.run([*cli, "materialize", "--config", str(project / "configs/e2e.yaml")],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = json.loads((project / "data/releases/current.json").read_text())

    with DagsterProcesses(home=home, env=env, daemon=True, log_dir=base / "logs") as dagster:
        dagster.wait_ready()
        # Written under a temporary name and renamed, as a careful writer does; the sensor would
        # also wait for a file that keeps changing.
        (project / "data/incoming").mkdir(exist_ok=True)
        tmp = project / "data/incoming/shifted.jsonl.tmp"
        tmp.write_text(shifted_batch())
        dropped = time.time()
        tmp.rename(project / "data/incoming/shifted.jsonl")
        ingest = wait_for("ingestion run finished", lambda: finished(dagster, "llm_assets/cause", "incoming_data"),
                          240, dagster)
        retrain = wait_for("retrain run finished", lambda: finished(dagster, "llm_assets/cause", "drift"), 480, dagster)
        released = time.time()
        time.sleep(12)  # two more sensor ticks: nothing may start twice
        counts = {cause: len(runs(dagster, "llm_assets/cause", cause)) for cause in ("incoming_data", "drift")}
        yield {"project": project, "dagster": dagster, "before": before, "ingest": ingest, "retrain": retrain,
               "dropped": dropped, "released": released, "counts": counts}


def test_dropped_batch_is_ingested_and_its_drift_report_finds_drift(closed_loop):
    ingest, dagster = closed_loop["ingest"], closed_loop["dagster"]
    assert ingest["status"] == "SUCCESS", dagster.logs()
    assert ingest["jobName"] == "ingest_job"
    tags = {t["key"]: t["value"] for t in ingest["tags"]}
    assert tags["llm_assets/incoming_file"] == "shifted.jsonl" and tags["dagster/partition"].startswith("shifted.jsonl-")
    run_id, report = latest_metadata(dagster, "drift_report")
    assert run_id == ingest["runId"]
    assert report["drift_detected"] is True and report["source"] == f"incoming_batch:{tags['dagster/partition']}"


def test_the_drift_report_started_one_retrain_that_released_a_new_model(closed_loop):
    ingest, retrain, dagster, project = (closed_loop[k] for k in ("ingest", "retrain", "dagster", "project"))
    tags = {t["key"]: t["value"] for t in retrain["tags"]}
    assert retrain["jobName"] == "retrain_job"
    assert tags["llm_assets/drift_report_run_id"] == ingest["runId"]  # the lineage back to the report
    assert tags["dagster/sensor_name"] == "drift_sensor" and tags["llm_assets/lane"] == "training"
    assert closed_loop["counts"] == {"incoming_data": 1, "drift": 1}
    steps = dagster.graphql(STEPS, {"runId": retrain["runId"]})["runOrError"]["stepStats"]
    assert retrain["status"] == "SUCCESS", (steps, dagster.logs())
    after = json.loads((project / "data/releases/current.json").read_text())
    assert after["version"] != closed_loop["before"]["version"]  # new data -> new weights -> new version
    assert after["previous"] == closed_loop["before"]["version"]
    run_id, release = latest_metadata(dagster, "release")
    assert run_id == retrain["runId"] and release["version"] == after["version"]
    run_id, sft = latest_metadata(dagster, "sft_dataset")
    assert run_id == retrain["runId"] and sft["incoming_batch_documents"] > 0  # trained on the new batch

    t0 = closed_loop["dropped"]
    timings = {"drop_to_ingest_start_s": ingest["startTime"] - t0, "drop_to_ingest_end_s": ingest["endTime"] - t0,
               "drop_to_retrain_created_s": retrain["creationTime"] - t0,
               "drop_to_retrain_start_s": retrain["startTime"] - t0, "drop_to_release_s": retrain["endTime"] - t0,
               "retrain_run_s": retrain["endTime"] - retrain["startTime"]}
    print("\nend-to-end timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    assert 0 < timings["drop_to_ingest_start_s"] < timings["drop_to_retrain_start_s"] < timings["drop_to_release_s"]
