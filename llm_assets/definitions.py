"""The Dagster code location: everything under `llm_assets/defs/` is discovered, not hand-listed.

With $LLM_ASSETS_CELERY_BROKER set (e.g. redis://host:6379/0) where the code location loads, every
job's steps go to Celery workers over that broker (configs/scale_out/, README "Scaling out");
unset, they run in the run's own processes. `llm-assets materialize` always runs in its own process.
"""

import os
from pathlib import Path

import dagster as dg

CELERY_BROKER_ENV = "LLM_ASSETS_CELERY_BROKER"


def celery_step_executor() -> dg.ExecutorDefinition:
    """dagster-celery's executor reading the broker from the environment of the run's process, as the
    workers do (configs/scale_out/celery.yaml). Step results travel back through the same server
    (Redis serves as both; dagster-celery's default, rpc://, is meant for AMQP brokers)."""
    from dagster_celery import celery_executor

    broker = {"env": CELERY_BROKER_ENV}
    return celery_executor.configured({"broker": broker, "backend": broker})


@dg.definitions
def defs() -> dg.Definitions:
    found = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    if not os.environ.get(CELERY_BROKER_ENV):
        return found
    return dg.Definitions.merge(found, dg.Definitions(executor=celery_step_executor()))
