"""The `llm-assets` command as a user types it, in a throwaway project with its own Dagster home."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CLI = Path(sys.executable).with_name("llm-assets")


def run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(project / ".dagster")}
    return subprocess.run([str(CLI), *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def config(project: Path, n_docs: int) -> str:
    path = project / f"cfg{n_docs}.yaml"
    path.write_text(yaml.safe_dump({"ops": {"raw_corpus": {"config": {"stdlib_max_documents": n_docs}}}}))
    return str(path)


@pytest.mark.slow
def test_materialize_status_and_restore_byte_for_byte(project: Path):
    assert run(project, "init").returncode == 0
    first = run(project, "materialize", "--select", "raw_corpus", "--config", config(project, 30))
    assert first.returncode == 0, first.stderr
    assert "raw_corpus" in first.stdout and "documents=30" in first.stdout
    artifact = project / "data/lake/raw_corpus"
    v1, v1_md5 = tree_digest(artifact), yaml.safe_load((project / "dvc.lock").read_text())["stages"]["raw_corpus"]["outs"][0]["md5"]

    second = run(project, "materialize", "--select", "raw_corpus", "--config", config(project, 45))
    assert second.returncode == 0, second.stderr
    assert tree_digest(artifact) != v1

    status = run(project, "status")
    assert status.returncode == 0 and "raw_corpus" in status.stdout
    dvc_lines = status.stdout.split("dvc status:")[1]
    assert "raw_corpus:" not in dvc_lines  # recorded; downstream stages were never materialized
    assert "clean_corpus: " in dvc_lines and "changed outs (data/lake/clean_corpus deleted)" in dvc_lines

    restored = run(project, "restore", "raw_corpus", v1_md5)
    assert restored.returncode == 0, restored.stderr
    assert tree_digest(artifact) == v1


def test_unknown_selection_and_failed_run_exit_nonzero(project: Path):
    unknown = run(project, "materialize", "--select", "no_such_asset")
    assert unknown.returncode == 2 and "no_such_asset" in unknown.stderr and "Traceback" not in unknown.stderr
    malformed = run(project, "materialize", "--select", "raw_corpus+clean_corpus")
    assert malformed.returncode == 2 and "Traceback" not in malformed.stderr
    assert "Invalid selection string" in malformed.stderr and "Accepted forms: 'raw_corpus'" in malformed.stderr
    (project / "data/raw/bad.jsonl").write_text("{not json}\n")
    cfg = project / "user.yaml"
    cfg.write_text(yaml.safe_dump({"ops": {"raw_corpus": {"config": {"include_stdlib": False}}}}))
    failed = run(project, "materialize", "--select", "raw_corpus", "--config", str(cfg))
    assert failed.returncode == 1
    assert "bad.jsonl:1: invalid JSON" in failed.stdout + failed.stderr


@pytest.mark.slow
def test_ingest_takes_each_dropped_file_once_and_a_failed_one_again(project: Path):
    from helpers import shifted_batch

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert run(project, "init").returncode == 0
    refused = run(project, "materialize", "--select", "incoming_batch")
    assert refused.returncode == 2 and "llm-assets ingest" in refused.stderr
    built = run(project, "materialize", "--select", "group:data or key:tokenizer or key:sft_dataset",
                "--config", tiny)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "left out incoming_batch" in built.stderr
    (project / "data/incoming/shifted.jsonl").write_text(shifted_batch())
    (project / "data/incoming/broken.jsonl").write_text("{not json}\n")
    first = run(project, "ingest", "--config", tiny)
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]  # broken.jsonl failed
    assert re.search(r"^shifted.jsonl: batch shifted.jsonl-\w+ ingested$", first.stdout, re.M)
    assert re.search(r"^broken.jsonl: batch broken.jsonl-\w+ FAILED, run ", first.stdout, re.M)
    assert "drift_detected=True" in first.stdout
    [batch] = [p for p in (project / "data/lake/incoming_batch").iterdir() if not p.name.startswith(".")]
    assert (batch / "documents.parquet").is_file()
    again = run(project, "ingest", "--config", tiny)
    assert again.returncode == 1
    assert re.search(r"^shifted.jsonl: batch \S+ already ingested", again.stdout, re.M)
    assert re.search(r"^broken.jsonl: batch \S+ FAILED, run ", again.stdout, re.M)  # taken again, not "already"


def start(project: Path, out: Path, *args: str) -> subprocess.Popen:
    """`llm-assets ARGS` in the background, its output (stdout and stderr) into `out`."""
    env = {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(project), "DAGSTER_HOME": str(project / ".dagster")}
    with out.open("w") as f:
        return subprocess.Popen([str(CLI), *args], cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_until(condition, timeout_s: float = 120.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def holding_run(holder: Path, pid: int) -> str | None:
    """The run id in the writer lock's holder file while process `pid` holds it."""
    text = holder.read_text() if holder.exists() else ""
    match = re.fullmatch(rf"run (\S+) \(pid {pid} on .*", text.strip())
    return match and match[1]


def cached_rows(project: Path, md5: str) -> int:
    """Rows of the Parquet file in DVC version `md5` of an artifact, read from the local cache."""
    import pyarrow.parquet as pq
    from dvc.repo import Repo

    repo = Repo(str(project))
    try:
        odb = repo.cache.local
        [entry] = [e for e in json.loads(Path(odb.oid_to_path(md5)).read_text()) if e["relpath"].endswith(".parquet")]
        return pq.read_metadata(odb.oid_to_path(entry["md5"])).num_rows
    finally:
        repo.close()


def test_one_writer_per_asset_the_second_fails_naming_the_first_or_waits(project: Path, tmp_path: Path):
    """Run A (30 documents) is frozen (SIGSTOP) while it holds raw_corpus; B (45) is refused at once
    naming A's run, C (45, writer_wait_s) waits for A. Each run's metadata names the version it wrote."""
    import dagster as dg

    assert run(project, "init").returncode == 0
    holder = project / "data/lake/.locks/raw_corpus.holder"
    for _ in range(3):  # A may finish between two polls; then it did not overlap: try again
        a = start(project, tmp_path / "a.log", "materialize", "--select", "raw_corpus", "--config", config(project, 30))
        a_run = wait_until(lambda: holding_run(holder, a.pid) or a.poll() is not None, what="A to take the lock")
        os.kill(a.pid, signal.SIGSTOP)
        if a_run is not True and holding_run(holder, a.pid):  # A removes the holder file before letting go
            break
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()[-3000:]
    else:
        pytest.fail("run A never held raw_corpus long enough to be stopped")
    try:
        waiting = tmp_path / "wait.yaml"
        waiting.write_text(yaml.safe_dump({"ops": {"raw_corpus": {"config": {"stdlib_max_documents": 45}}},
                                           "resources": {"lake": {"config": {"writer_wait_s": 300}}}}))
        b = start(project, tmp_path / "b.log", "materialize", "--select", "raw_corpus", "--config", config(project, 45))
        c = start(project, tmp_path / "c.log", "materialize", "--select", "raw_corpus", "--config", str(waiting))
        assert b.wait(timeout=180) == 1
        b_log = (tmp_path / "b.log").read_text()
        assert f"raw_corpus is being written by run {a_run}" in b_log, b_log[-3000:]
        wait_until(lambda: "waiting up to 300 s" in (tmp_path / "c.log").read_text() or c.poll() is not None,
                   timeout_s=180, what="C to wait")
        assert f"raw_corpus is being written by run {a_run}" in (tmp_path / "c.log").read_text()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert c.wait(timeout=180) == 0, (tmp_path / "c.log").read_text()[-3000:]

    with dg.DagsterInstance.from_config(str(project / ".dagster")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("raw_corpus"), limit=10).records
        written = {r.run_id: {k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records}
    assert len(written) == 2 and a_run in written  # B wrote nothing
    [c_run] = set(written) - {a_run}
    assert written[a_run]["documents"] == 30 and written[c_run]["documents"] == 45
    assert written[a_run]["dvc_md5"] != written[c_run]["dvc_md5"]
    assert cached_rows(project, written[a_run]["dvc_md5"]) == 30  # the version A names holds A's documents
    assert cached_rows(project, written[c_run]["dvc_md5"]) == 45
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["raw_corpus"]["outs"][0]["md5"] == \
        written[c_run]["dvc_md5"]  # C wrote last
