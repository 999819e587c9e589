"""The Dagster code location: everything under `llm_assets/defs/` is discovered, not hand-listed.

With $LLM_ASSETS_CELERY_BROKER set (e.g. redis://host:6379/0) where the code location loads, every
job's steps go to Celery workers over that broker (configs/scale_out/, README "Scaling out");
unset, each step runs in a process forked from one that has the libraries loaded
(forked_step_executor). `llm-assets materialize` always runs in its own process.
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


# What a step imports before its asset's code runs: spawned, a step process spent ~9 s here on
# these imports and on loading this location (`python -c 'import torch, transformers, peft, trl'`
# 6.8 s, defs() 1.5 s more). Forked from a server that imported them once per run, it starts at once.
STEP_PRELOAD = ["llm_assets.definitions", "torch", "transformers", "peft", "trl"]


def forked_step_executor() -> dg.ExecutorDefinition:
    """Dagster's multiprocess executor (a process per step, memory returned when it ends) with its
    `forkserver` start method instead of `spawn`, preloading STEP_PRELOAD. Runs the daemon or the UI
    launch use it; `llm-assets materialize` runs in process."""
    return dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {"preload_modules": STEP_PRELOAD}}}, name="forked_step_executor")


@dg.definitions
def defs() -> dg.Definitions:
    found = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    executor = celery_step_executor() if os.environ.get(CELERY_BROKER_ENV) else forked_step_executor()
    return dg.Definitions.merge(found, dg.Definitions(executor=executor))
