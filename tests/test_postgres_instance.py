"""The Dagster instance on PostgreSQL, as a team runs it: Debian's PostgreSQL 15 started by the test
(tests/servers.py), `llm-assets init --postgres URL`, the data group materialized and a batch
ingested on that instance, the sensors ticked against it, and everything read back both through
Dagster and straight from the database."""

import os
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import dagster as dg
import psycopg2
import yaml
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from helpers import REPO, materialize, metadata, shifted_batch
from llm_assets.definitions import defs
from llm_assets.defs.automation import drift_sensor, incoming_data_sensor
from llm_assets.defs.resources import LakeResource
from llm_assets.lib.common.instance_config import with_driver

CLI = Path(sys.executable).with_name("llm-assets")
DATA = ["raw_corpus", "clean_corpus", "deduped_shards"]


def tick(sensor, project: Path, instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"lake": LakeResource(project_dir=str(project))}) as ctx:
        return sensor(ctx)


def ingest(project: Path, instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """The batch the sensor asked for, on its partition (incoming_batch only: drift_report needs a
    trained tokenizer and post-training data, which the data group does not build)."""
    instance.add_dynamic_partitions("incoming_batches", [request.partition_key])
    ops = {op: cfg for op, cfg in request.run_config["ops"].items() if op == "incoming_batch"}
    run_config = {"ops": ops,
                  "resources": {"lake": {"config": {"project_dir": str(project)}}}}
    return defs().resolve_implicit_global_asset_job_def().execute_in_process(
        run_config=run_config, instance=instance, partition_key=request.partition_key, tags=request.tags,
        asset_selection=[dg.AssetKey("incoming_batch")], raise_on_error=False)


def rows(url: str, sql: str) -> list[tuple]:
    with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_init_postgres_then_materialize_ingest_and_tick_sensors_on_it(project, postgres_url, tmp_path, tiny_run_config,
                                                                       monkeypatch):
    monkeypatch.setenv("LLM_ASSETS_CONFIG", str(REPO / "configs" / "tiny.yaml"))  # what sensor runs use
    home = tmp_path / "dagster_home"
    env = {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(home)}
    done = subprocess.run([str(CLI), "init", "--postgres", postgres_url], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"DAGSTER_HOME {home} (postgres storage)" in done.stdout
    assert yaml.safe_load((home / "dagster.yaml").read_text())["storage"] == {"postgres": {"postgres_url": with_driver(postgres_url)}}

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        result = materialize(project, tiny_run_config, DATA, instance)
        assert result.success

        first = tick(incoming_data_sensor, project, instance)
        assert not first.run_requests
        batch = project / "data" / "incoming" / "shifted.jsonl"
        batch.parent.mkdir(exist_ok=True)
        batch.write_text(shifted_batch())
        os.utime(batch, (time.time() - 60, time.time() - 60))  # settled: not being written any more
        [request] = tick(incoming_data_sensor, project, instance, first.cursor).run_requests
        assert ingest(project, instance, request).success
        # The sensor reads the batch's materialized partition back from PostgreSQL: no second run.
        os.utime(batch, (time.time() - 30, time.time() - 30))
        assert not tick(incoming_data_sensor, project, instance).run_requests
        assert tick(drift_sensor, project, instance).skip_reason.skip_message == "0 new drift report(s), none found drift"
        shards = metadata(instance, "deduped_shards")

    # Another process (another machine, in a team) opening the same dagster.yaml sees it all.
    with dg.DagsterInstance.from_config(str(home)) as other:
        assert metadata(other, "deduped_shards") == shards and shards["train_documents"] > 0
        assert other.get_materialized_partitions(dg.AssetKey("incoming_batch")) == {request.partition_key}
        assert other.get_run_by_id(result.run_id).is_success
    stored = dict(rows(postgres_url, "SELECT asset_key, count(*) FROM event_logs "
                                     "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key"))
    assert stored == {f'["{name}"]': 1 for name in [*DATA, "incoming_batch"]}
    assert rows(postgres_url, "SELECT count(*) FROM runs") == [(2,)]
    assert not list(home.rglob("*.db"))  # no SQLite storage beside dagster.yaml


def test_init_postgres_refuses_a_bad_url_and_an_unreachable_database_leaving_the_file(project, tmp_path):
    from dagster_procs import free_port

    home = tmp_path / "dagster_home"
    env = {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(home)}
    init = [str(CLI), "init", "--postgres"]
    assert subprocess.run([str(CLI), "init"], cwd=project, env=env, capture_output=True, timeout=120).returncode == 0
    before = (home / "dagster.yaml").read_text()
    bad = subprocess.run([*init, "mysql://u@h/d"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected postgresql://USER" in bad.stderr and "Traceback" not in bad.stderr
    bare = subprocess.run([*init, "env:PG_URL"], cwd=project, env={**env, "PG_URL": "postgresql://u@h/d"},
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "$PG_URL must name the driver: postgresql+psycopg2://u@h/d" in bare.stderr
    nobody = f"postgresql://dagster@127.0.0.1:{free_port()}/dagster"  # nothing listens there
    down = subprocess.run([*init, nobody], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1 and "cannot open the database" in down.stderr and "Connection refused" in down.stderr
    assert "Traceback" not in down.stderr
    assert (home / "dagster.yaml").read_text() == before
