"""dagster.yaml's one writer: SQLite by default, PostgreSQL by URL or by environment variable, and an
existing file left alone unless --postgres asks to switch. That Dagster loads both files and stores
runs in PostgreSQL is tests/test_postgres_instance.py's part."""

from pathlib import Path

import pytest
import yaml

from llm_assets.lib.common.instance_config import dagster_yaml, storage_kind, with_driver, write_dagster_yaml


def test_default_is_sqlite_with_the_run_lanes_and_no_telemetry():
    config = yaml.safe_load(dagster_yaml())
    assert "storage" not in config  # Dagster's default: SQLite under $DAGSTER_HOME
    assert config["telemetry"] == {"enabled": False} and config["nux"] == {"enabled": False}
    lanes = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {(x["value"], x["limit"]) for x in lanes} == {("ingest", 1), ("training", 1)}


@pytest.mark.parametrize("url, expected", [
    # The driver is named: SQLAlchemy 2.1 would take a bare postgresql:// for psycopg 3, not installed.
    ("postgresql://dagster:s3cret@db.internal:5432/dagster", "postgresql+psycopg2://dagster:s3cret@db.internal:5432/dagster"),
    ("postgres://u@127.0.0.1:6543/d", "postgresql+psycopg2://u@127.0.0.1:6543/d"),
    ("postgresql+psycopg2://u@/d?host=/run/pg", "postgresql+psycopg2://u@/d?host=/run/pg"),
    ("env:DAGSTER_PG_URL", {"env": "DAGSTER_PG_URL"}),
])
def test_postgres_storage_keeps_the_lanes(url, expected):
    config = yaml.safe_load(dagster_yaml(url))
    assert config["storage"] == {"postgres": {"postgres_url": expected}}
    assert config["concurrency"] == yaml.safe_load(dagster_yaml())["concurrency"]


@pytest.mark.parametrize("url", ["mysql://u@h/d", "127.0.0.1:5432", "env:", "env:NOT A NAME", ""])
def test_anything_else_fails_naming_the_flag_and_the_forms(url):
    with pytest.raises(ValueError, match=r"--postgres .*postgresql://USER.*env:VARIABLE"):
        dagster_yaml(url)


def test_with_driver_names_psycopg2_once():
    assert with_driver("postgres://u@h/d") == with_driver(with_driver("postgresql://u@h/d")) == "postgresql+psycopg2://u@h/d"


def test_written_when_missing_kept_when_edited_replaced_by_postgres(tmp_path):
    path = write_dagster_yaml(tmp_path)
    assert path.read_text() == dagster_yaml() and storage_kind(tmp_path) == "sqlite"
    path.write_text(dagster_yaml() + "# a person's edit\n")
    write_dagster_yaml(tmp_path)  # `llm-assets init` again, or any command: the edit stays
    assert path.read_text().endswith("# a person's edit\n")
    write_dagster_yaml(tmp_path, "env:DAGSTER_PG_URL")
    assert path.read_text() == dagster_yaml("env:DAGSTER_PG_URL") and storage_kind(tmp_path) == "postgres"
    write_dagster_yaml(tmp_path)  # a later plain `init` does not switch back
    assert storage_kind(tmp_path) == "postgres"
    assert [p.name for p in tmp_path.iterdir()] == ["dagster.yaml"]  # no temp file left beside it


def test_the_ready_config_is_what_init_writes():
    """configs/scale_out/dagster.postgres.yaml, for machines that copy the file instead of running
    `llm-assets init --postgres env:DAGSTER_PG_URL`, is that command's output byte for byte."""
    ready = Path(__file__).resolve().parents[2] / "configs" / "scale_out" / "dagster.postgres.yaml"
    assert ready.read_text() == dagster_yaml("env:DAGSTER_PG_URL")
