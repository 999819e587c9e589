"""Steps on Celery workers, as a team runs them: redis-server and PostgreSQL started by the test,
two `dagster-celery worker start` workers reading configs/scale_out/celery.yaml, and the data group
run with $LLM_ASSETS_CELERY_BROKER set, so every step goes through Redis to a worker, which writes
its events to the shared PostgreSQL instance. Workers, Redis and PostgreSQL are stopped after."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableRepository  # what dagster's CLI builds

from helpers import REPO
from llm_assets.definitions import CELERY_BROKER_ENV
from llm_assets.lib.common.instance_config import write_dagster_yaml

BIN = Path(sys.executable).parent
DATA = ["raw_corpus", "clean_corpus", "deduped_shards"]
WORKERS = ("w1", "w2")


def start_worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    # --pool solo: one step at a time, in the worker's own process. Celery's default pool runs tasks
    # in daemonic children, which may not start processes: dedup's signature pool and torchrun would fail.
    cmd = [BIN / "dagster-celery", "worker", "start", "-A", "dagster_celery.app", "-n", name,
           "-y", REPO / "configs" / "scale_out" / "celery.yaml", "--", "--pool", "solo", "--concurrency", "1"]
    with open(log, "wb") as out:
        # Own session: the worker's celery child and its pool processes stop with it.
        return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each worker's process group (Celery's warm shutdown), SIGKILL what is left after 20 s."""
    for proc in procs:
        with_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with_group(proc, signal.SIGKILL)
        proc.wait()


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for_workers(broker: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120) -> set[str]:
    """Until both workers answer a ping over the broker; a worker that exits fails at once."""
    from dagster_celery.make_app import make_app

    app = make_app({"broker": broker, "backend": broker})
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        names = {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply}
        if names >= set(WORKERS):
            return names
        if time.monotonic() > deadline:
            raise TimeoutError("workers not up:\n" + "\n".join(p.read_text(errors="replace")[-2000:] for p in logs))


@pytest.fixture
def workers(redis_url, postgres_url, project, tmp_path, monkeypatch):
    """Two Celery workers on a Redis broker, sharing a PostgreSQL instance with this test."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    write_dagster_yaml(home, postgres_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(CELERY_BROKER_ENV, redis_url)
    monkeypatch.setenv("LLM_ASSETS_PROJECT_DIR", str(project))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # `celery` is the venv's
    logs = [tmp_path / f"{name}.log" for name in WORKERS]
    procs = []
    try:
        for name, log in zip(WORKERS, logs):
            procs.append(start_worker(name, env, log))
        wait_for_workers(redis_url, procs, logs)
        yield home
    finally:
        stop(procs)


def steps_by_worker(instance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker (name@host) that ran it, from the engine events each worker
    writes to the instance when it takes a step."""
    ran_on = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        metadata = entry.dagster_event.event_specific_data.metadata
        if "Celery worker" in metadata:
            ran_on[entry.dagster_event.step_key] = metadata["Celery worker"].value
    return ran_on


@pytest.mark.slow  # each worker imports the code location before its first step: ~10 s of CPU apiece
# dagster-celery registers its step task again for every step it sends; Celery 5.7 warns, harmlessly.
@pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")
def test_the_data_group_runs_step_by_step_on_two_celery_workers(workers, project, tiny_run_config):
    job = ReconstructableRepository.for_module("llm_assets.definitions", "defs", str(REPO)).get_reconstructable_job(
        "data_job")
    run_config = {**tiny_run_config, "resources": {"lake": {"config": {"project_dir": str(project)}}}}
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(job, instance, run_config=run_config) as result:
            assert result.success, [str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure]
            run_id = result.run_id
        ran_on = steps_by_worker(instance, run_id)
        for asset in DATA:  # written by the workers, recorded in PostgreSQL under this run
            assert instance.get_latest_materialization_event(dg.AssetKey(asset)).run_id == run_id
    # The data group is a chain, so which idle worker takes each step is Celery's choice: every step
    # ran on one of the two, none in this process.
    assert set(ran_on) == set(DATA), ran_on
    assert {worker.split("@")[0] for worker in ran_on.values()} <= set(WORKERS), ran_on
    assert all((project / "data" / "lake" / asset).is_dir() for asset in DATA)


def test_jobs_send_steps_to_celery_only_when_a_broker_is_set(monkeypatch):
    from llm_assets.definitions import defs

    monkeypatch.delenv(CELERY_BROKER_ENV, raising=False)
    assert defs().resolve_job_def("data_job").executor_def.name == "forked_step_executor"  # a process per step
    monkeypatch.setenv(CELERY_BROKER_ENV, "redis://127.0.0.1:6379/0")
    d = defs()
    assert {d.resolve_job_def(job).executor_def.name for job in ("data_job", "ingest_job", "pretrain_job")} == {"celery"}
    assert d.resolve_implicit_global_asset_job_def().executor_def.name == "celery"
