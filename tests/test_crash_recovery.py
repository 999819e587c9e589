"""A SIGKILL in the middle of `llm-assets materialize`, and the commands after it, as a user runs them:
nothing needs repairing by hand (issue 15: a kill inside DVC's write left dvc.lock empty, and every
later run failed until it was fixed by hand; the killed run stayed STARTED forever)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from helpers import REPO, dead_pid
from llm_assets.cli import RUN_OWNER_TAG, print_unfinished_runs
from llm_assets.lib.common.atomic import owner

CLI = Path(sys.executable).with_name("llm-assets")
DVC = Path(sys.executable).with_name("dvc")
TINY = str(REPO / "configs" / "tiny.yaml")
# On top of tiny.yaml: 30 documents are plenty for raw_corpus and clean_corpus, the assets run here.
FEWER_DOCUMENTS = {"ops": {"raw_corpus": {"config": {"stdlib_parts": ["modules"], "stdlib_max_documents": 30}}}}
# The llm-assets command, killed with its whole process group at the moment DVC opens dvc.lock to
# write it (`open(..., "w+")` has just truncated it): the state a SIGKILL during the write leaves.
# Run with `python -P`, so that `llm_assets` is the installed package, not the project's symlink.
KILLED_IN_LOCK_WRITE = """
import os, signal, sys
import dvc.utils.serialize._yaml as dvc_yaml
from llm_assets.cli import main

dump = dvc_yaml._dump
def die_in_lock_write(data, stream):
    if os.path.basename(getattr(stream, "name", "")) == "dvc.lock":
        os.killpg(0, signal.SIGKILL)
    return dump(data, stream)
dvc_yaml._dump = die_in_lock_write
sys.exit(main(sys.argv[1:]))
"""


def env(project: Path) -> dict:
    return {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(project / ".dagster")}


def cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], cwd=project, env=env(project), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_inside_the_dvc_lock_write_then_status_and_the_next_run_need_no_repair(project: Path):
    assert cli(project, "init").returncode == 0
    (project / "fewer.yaml").write_text(yaml.safe_dump(FEWER_DOCUMENTS))
    configs = ["--config", TINY, "--config", str(project / "fewer.yaml")]
    killed = subprocess.run([sys.executable, "-P", "-c", KILLED_IN_LOCK_WRITE, "materialize", "--select", "raw_corpus",
                             *configs], cwd=project, env=env(project), capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (project / "dvc.lock").read_text() == ""  # what the issue found
    assert (project / "data/lake/raw_corpus").is_dir()  # renamed into place, never recorded

    status = cli(project, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(project / ".dagster")) as instance:
        (run,) = [r.dagster_run for r in instance.get_run_records()]
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.run_id[:8] in status.stdout and "is gone: marked FAILED" in status.stdout
    (raw_line,) = [line for line in status.stdout.splitlines() if line.startswith("  raw_corpus: ")]
    assert "changed outs (data/lake/raw_corpus" in raw_line  # unrecorded, and shown as such

    # The next run, of the asset downstream, records raw_corpus as the killed run left it, then its own.
    after = cli(project, "materialize", "--select", "clean_corpus", *configs)
    assert after.returncode == 0, after.stderr[-2000:]
    assert {"raw_corpus", "clean_corpus"} <= set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    dvc = subprocess.run([DVC, "status", "raw_corpus", "clean_corpus"], cwd=project, capture_output=True, text=True)
    assert dvc.returncode == 0 and "Data and pipelines are up to date." in dvc.stdout, dvc.stdout + dvc.stderr


def test_status_marks_failed_only_the_runs_whose_process_is_gone(capsys):
    host = socket.gethostname()
    with dg.instance_for_test() as instance:
        def started(tags: dict) -> str:
            return instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED,
                                                  tags=tags)).run_id
        killed = started({RUN_OWNER_TAG: f"{dead_pid()}@{host}"})
        running = started({RUN_OWNER_TAG: owner()})  # this very process: alive
        from_daemon = started({})  # no owner recorded: not ours to judge
        elsewhere = started({RUN_OWNER_TAG: f"{dead_pid()}@another-host"})

        print_unfinished_runs(instance)
        status = {r: instance.get_run_by_id(r).status for r in (killed, running, from_daemon, elsewhere)}
        assert status == {killed: dg.DagsterRunStatus.FAILURE, running: dg.DagsterRunStatus.STARTED,
                          from_daemon: dg.DagsterRunStatus.STARTED, elsewhere: dg.DagsterRunStatus.STARTED}
        lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
        assert "is gone: marked FAILED" in lines[killed[:8]] and "running (process" in lines[running[:8]]
        assert "not checked" in lines[from_daemon[:8]] and "not checked" in lines[elsewhere[:8]]
        failure = instance.all_logs(killed, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "is gone, killed before the run ended" in failure[0].dagster_event.message

        print_unfinished_runs(instance)  # the failed run is no longer listed
        assert killed[:8] not in capsys.readouterr().out
