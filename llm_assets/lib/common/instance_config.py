"""The Dagster instance's `dagster.yaml`, written by `llm-assets init` and nothing else.

One machine: SQLite under $DAGSTER_HOME (the default). A team: `storage: postgres:` (the
dagster-postgres package) holds the run, event-log and schedule storage in one PostgreSQL database,
so the UI, the daemon, `llm-assets` and Celery workers on any machine share runs, materializations,
sensor cursors and dynamic partitions.

    >>> from llm_assets.lib.common.instance_config import dagster_yaml
    >>> print(dagster_yaml("env:DAGSTER_PG_URL").split("storage:")[1].strip())
    postgres:
      postgres_url:
        env: DAGSTER_PG_URL
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llm_assets.lib.common.atomic import write_text_atomically

HEADER = """\
# Written by `llm-assets init{how}`. {storage}
telemetry:
  enabled: false
nux:
  enabled: false
# Runs the daemon launches (sensors, schedules, the UI) queue per lane: one ingestion at a time, so
# each batch is deduplicated against the batches before it, and one training run at a time, since
# training runs write the same checkpoints.
concurrency:
  runs:
    tag_concurrency_limits:
      - key: llm_assets/lane
        value: ingest
        limit: 1
      - key: llm_assets/lane
        value: training
        limit: 1
"""
SQLITE_NOTE = ("SQLite storage under this directory (the default);\n# `llm-assets init --postgres URL` "
               "puts it in PostgreSQL to share the instance between machines.")
POSTGRES_NOTE = ("Run, event-log and schedule storage in PostgreSQL\n# (dagster-postgres): every "
                 "machine with this file shares one instance; a step's captured stdout/stderr\n# stay on "
                 "the machine that ran it.")
ENV_PREFIX = "env:"  # `--postgres env:NAME`: the URL is read from $NAME when the instance loads
# SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg (3) driver, which dagster-postgres does not
# install; it depends on psycopg2. The file names the driver, so any SQLAlchemy 2.x loads it.
DRIVER_SCHEME = "postgresql+psycopg2://"
BARE_SCHEMES = ("postgresql://", "postgres://")


def with_driver(url: str) -> str:
    """`url` naming the psycopg2 driver (postgresql+psycopg2://); other URLs are returned unchanged."""
    for scheme in BARE_SCHEMES:
        if url.startswith(scheme):
            return DRIVER_SCHEME + url[len(scheme):]
    return url


def postgres_url_value(url: str) -> str | dict:
    """What goes under `postgres_url:`: the URL (naming its driver), or `{env: NAME}` for `env:NAME`,
    which keeps the password out of the file ($NAME must then name the driver itself). Anything else
    fails, naming the accepted forms."""
    if url.startswith(ENV_PREFIX) and url[len(ENV_PREFIX):].isidentifier():
        return {"env": url[len(ENV_PREFIX):]}
    if url.startswith((*BARE_SCHEMES, "postgresql+")):
        return with_driver(url)
    raise ValueError(f"--postgres {url!r}: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DB "
                     f"(or ?host=/socket/dir) or env:VARIABLE naming one")


def dagster_yaml(postgres_url: str | None = None) -> str:
    """The file's text: SQLite storage (None) or PostgreSQL storage at `postgres_url`."""
    if postgres_url is None:
        return HEADER.format(how="", storage=SQLITE_NOTE)
    value = postgres_url_value(postgres_url)
    storage = yaml.safe_dump({"storage": {"postgres": {"postgres_url": value}}}, sort_keys=False)
    if isinstance(value, dict):
        storage = (f"# ${value['env']} holds {DRIVER_SCHEME}USER:PASSWORD@HOST:5432/DB on every machine"
                   f" (the driver named).\n{storage}")
    return HEADER.format(how=" --postgres", storage=POSTGRES_NOTE) + storage


def write_dagster_yaml(home: Path, postgres_url: str | None = None) -> Path:
    """$DAGSTER_HOME/dagster.yaml: written when missing, or replaced when `postgres_url` is given
    (an explicit switch to PostgreSQL); an existing file is otherwise left as it is, since a person
    may have edited it."""
    path = Path(home) / "dagster.yaml"
    if postgres_url is not None or not path.exists():
        write_text_atomically(path, dagster_yaml(postgres_url))
    return path


def storage_kind(home: Path) -> str:
    """'postgres' or 'sqlite': what the dagster.yaml in `home` stores the instance in."""
    config = yaml.safe_load((Path(home) / "dagster.yaml").read_text()) or {}
    storage = config.get("storage") or {}
    return "postgres" if "postgres" in storage else "sqlite"
