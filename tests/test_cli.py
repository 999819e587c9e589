"""The `llm-assets` command as a user types it, in a throwaway project with its own Dagster home."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

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


def test_ingest_takes_each_dropped_file_once(project: Path):
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
    first = run(project, "ingest", "--config", tiny)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "shifted.jsonl: batch shifted.jsonl-" in first.stdout and "ingested" in first.stdout
    assert "drift_detected=True" in first.stdout
    [batch] = [p for p in (project / "data/lake/incoming_batch").iterdir() if not p.name.startswith(".")]
    assert (batch / "documents.parquet").is_file()
    again = run(project, "ingest", "--config", tiny)
    assert again.returncode == 0 and "already ingested" in again.stdout
