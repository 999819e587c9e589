"""record/restore artifact versions against real DVC in a throwaway project with a local remote."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from llm_assets.lib.common import versioning
from llm_assets.lib.common.versioning import (
    VersioningError,
    current_version,
    dvc_status,
    init_dvc,
    record_version,
    restore_version,
)

DVC = Path(sys.executable).parent / "dvc"
DVC_YAML = """\
stages:
  a:
    cmd: echo a
    outs:
      - data/lake/a
  b:
    cmd: echo b
    deps:
      - data/lake/a
    outs:
      - data/lake/b
"""


@pytest.fixture(autouse=True)
def dvc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DVC keeps per-repo state under /var/tmp/dvc by default; keep it in the test's tmp dir.
    # Environment variables also reach the dvc and python subprocesses below.
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site-cache"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def ab(tmp_path: Path) -> Path:
    """Project with stages a -> b, data/lake/a written (text, binary, nested), remote in tmp."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    init_dvc(root, remote_url=tmp_path / "remote")
    write(root / "data/lake/a", {"x.txt": b"hello\n", "sub/deep/w.bin": bytes(range(256)) * 40})
    write(root / "data/lake/b", {"y.txt": b"from a\n"})
    return root


def write(directory: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def snapshot(directory: Path) -> dict[str, bytes]:
    files = (p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in files}


def lock_entry(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["outs"][0]


def remote_objects(remote: Path) -> set[str]:
    return {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}


def test_record_commits_pushes_and_leaves_status_clean(ab: Path):
    v = record_version(ab, "a")
    assert v.stage == "a" and v.path == "data/lake/a"
    assert v.md5.endswith(".dir") and len(v.md5) == 36 and v.short == v.md5[:12]
    assert (v.size, v.nfiles) == (6 + 256 * 40, 2)
    assert lock_entry(ab, "a")["md5"] == v.md5
    assert current_version(ab, "a") == v
    # One manifest plus one object per file, under DVC 3's files/md5/<2 hex>/<30 hex> layout.
    hex_ = v.md5.removesuffix(".dir")
    objects = remote_objects(ab.parent / "remote")
    assert f"files/md5/{hex_[:2]}/{hex_[2:]}.dir" in objects
    # b sat on disk unrecorded, as after a run killed between writing and recording it, so recording
    # a recorded b too: a's manifest and two files, b's manifest and file.
    assert len(objects) == 5 and current_version(ab, "b").nfiles == 1
    assert dvc_status(ab) == {}

    write(ab / "data/lake/a", {"x.txt": b"hello again\n"})
    assert current_version(ab, "a") == v  # status looks, it does not record
    assert set(dvc_status(ab)) == {"a", "b"}  # a's out and b's dep changed
    record_version(ab, "a")
    assert set(dvc_status(ab)) == {"b"}
    record_version(ab, "b")
    assert dvc_status(ab) == {}
    cli = subprocess.run([DVC, "status"], cwd=ab, capture_output=True, text=True, check=True)
    assert "Data and pipelines are up to date." in cli.stdout
    assert current_version(ab, "missing") is None


def test_restore_round_trip_and_from_remote_after_cache_loss(ab: Path):
    a = ab / "data/lake/a"
    v1, files1 = record_version(ab, "a"), snapshot(a)
    (a / "x.txt").write_bytes(b"changed\n")
    (a / "sub/deep/w.bin").unlink()
    write(a, {"sub/new.bin": b"\x00\xff" * 500})
    v2, files2 = record_version(ab, "a"), snapshot(a)
    assert v1.md5 != v2.md5 and files1 != files2

    assert restore_version(ab, "a", v1.md5) == v1
    assert snapshot(a) == files1
    assert not (a / "sub/new.bin").exists()
    assert current_version(ab, "a") == v1 and "a" not in dvc_status(ab)

    assert restore_version(ab, "a", v2.md5.removesuffix(".dir")) == v2
    assert snapshot(a) == files2

    # Without the local cache the objects come back from the remote; a prefix is enough.
    shutil.rmtree(ab / ".dvc/cache")
    assert restore_version(ab, "a", v1.md5[:8]) == v1
    assert snapshot(a) == files1
    assert "a" not in dvc_status(ab)


def test_unknown_or_malformed_hash_fails_and_leaves_artifact(ab: Path):
    a = ab / "data/lake/a"
    record_version(ab, "a")
    before, lock_before = snapshot(a), (ab / "dvc.lock").read_text()
    with pytest.raises(VersioningError, match=r"stage 'a'.*'0123456789abcdef'.*unchanged"):
        restore_version(ab, "a", "0123456789abcdef")
    with pytest.raises(VersioningError, match=r"stage 'a'.*'xyz'.*prefix of at least 8"):
        restore_version(ab, "a", "xyz")
    assert snapshot(a) == before
    assert (ab / "dvc.lock").read_text() == lock_before


def test_record_errors_name_stage_and_path(ab: Path, tmp_path: Path):
    with pytest.raises(VersioningError, match=r"stage 'nope' is not in .*dvc.yaml"):
        record_version(ab, "nope")
    shutil.rmtree(ab / "data/lake/b")
    with pytest.raises(VersioningError, match=r"stage 'b': output directory data/lake/b does not"):
        record_version(ab, "b")
    # A remote that cannot be written: its path is a regular file.
    (tmp_path / "remote").unlink(missing_ok=True)
    (tmp_path / "remote").write_text("not a directory")
    with pytest.raises(VersioningError, match=r"stage 'a': pushing data/lake/a to remote 'local'"):
        record_version(ab, "a")


def test_lock_timeout_is_a_clear_error(ab: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(versioning, "LOCK_TIMEOUT_S", 0.2)
    with FileLock(ab / ".dvc/tmp/llm_assets.lock"):
        with pytest.raises(VersioningError, match="another process is still running a DVC"):
            record_version(ab, "a")


def test_concurrent_records_queue_on_the_lock_and_all_land(ab: Path):
    # Three processes (two on the same stage) start while the test holds the lock, as a long
    # push would; they must wait, not fail on DVC's own lock (which gives up after ~3 s), and
    # then all record once it is released, contending with each other.
    script = (
        "import sys; from llm_assets.lib.common.versioning import record_version as r\n"
        "for _ in range(3): r(sys.argv[1], sys.argv[2])"
    )
    with FileLock(ab / ".dvc/tmp/llm_assets.lock"):
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(ab), s], stderr=subprocess.PIPE)
            for s in ("a", "b", "a")
        ]
        time.sleep(2.0)  # each process needs ~0.5 s to import DVC and reach the lock
        assert [p.poll() for p in procs] == [None, None, None]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    concurrent = {s: lock_entry(ab, s)["md5"] for s in ("a", "b")}
    serial = {s: record_version(ab, s).md5 for s in ("a", "b")}
    assert concurrent == serial
    assert dvc_status(ab) == {}


# Runs record_version or restore_version in a process that SIGKILLs itself inside DVC's write of
# dvc.lock: DVC opens the file with "w+" (truncating it), then dumps the YAML; argv[4] is the share
# of the new text that reaches the file before the kill (0: the empty dvc.lock the issue found).
KILL_IN_LOCK_WRITE = """
import io, os, signal, sys
import dvc.utils.serialize._yaml as dvc_yaml
from llm_assets.lib.common import versioning

dump = dvc_yaml._dump
def dump_and_die(data, stream):
    if os.path.basename(getattr(stream, "name", "")) != "dvc.lock":
        return dump(data, stream)
    text = io.StringIO()
    dump(data, text)
    stream.write(text.getvalue()[: int(len(text.getvalue()) * float(sys.argv[4]))])
    stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)
dvc_yaml._dump = dump_and_die

op, project, stage = sys.argv[1:4]
if op == "record":
    versioning.record_version(project, stage)
else:
    versioning.restore_version(project, stage, sys.argv[5])
"""


@pytest.mark.parametrize("op, cut, recorded_before", [
    ("record", 0.0, True), ("record", 0.5, True), ("record", 1.0, True), ("record", 0.5, False),
    ("restore", 0.0, True)])
def test_a_kill_inside_the_dvc_lock_write_is_repaired_by_the_next_record(
        ab: Path, op: str, cut: float, recorded_before: bool):
    a = ab / "data/lake/a"
    v1 = record_version(ab, "a") if recorded_before else None
    if op == "restore":
        write(a, {"x.txt": b"version two\n"})
        record_version(ab, "a")
        args = ["restore", str(ab), "a", str(cut), v1.md5]
    else:
        write(a, {"x.txt": b"version two\n"})  # renamed into place by a run, now being recorded
        args = ["record", str(ab), "a", str(cut)]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_LOCK_WRITE, *args], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    if cut == 0:
        assert (ab / "dvc.lock").read_text() == ""
    on_disk = snapshot(a)

    assert "a" in dvc_status(ab)  # looking repairs dvc.lock but records nothing
    record_version(ab, "b")  # the next run, of another asset
    assert dvc_status(ab) == {}  # a as the killed process left it on disk, and b after it, recorded
    assert snapshot(a) == on_disk
    if op == "restore":  # killed in the commit after the files came back
        assert on_disk["x.txt"] == b"hello\n" and current_version(ab, "a").md5 == v1.md5
    cli = subprocess.run([DVC, "status"], cwd=ab, capture_output=True, text=True, check=True)
    assert "Data and pipelines are up to date." in cli.stdout
    assert not (ab / ".dvc/tmp/llm_assets.pending.json").exists()


def test_a_cut_short_dvc_rwlock_does_not_stop_the_next_record(ab: Path):
    # What a kill inside DVC's own rewrite of .dvc/tmp/rwlock leaves (truncate, then write JSON).
    (ab / ".dvc/tmp/rwlock").write_text('{"read": {}, "write": {"data/lake/a": {"pid": 4')
    assert record_version(ab, "a") == current_version(ab, "a")


def test_an_unreadable_dvc_lock_is_rebuilt_from_the_last_good_copy_and_disk(ab: Path):
    v1 = record_version(ab, "a")
    (ab / "dvc.lock").write_text("schema: '2.0'\nstages:\n  a: [not, a, stage]\n")  # a hand edit gone wrong
    assert dvc_status(ab) == {}  # rebuilt: a from the copy, b (recorded with a) likewise
    assert current_version(ab, "a") == v1
    assert "not, a, stage" in (ab / ".dvc/tmp/llm_assets.dvc.lock.broken").read_text()  # kept for a look


def test_an_unrecorded_artifact_without_its_deps_waits_for_its_own_run(ab: Path):
    # DVC cannot record b while its dep a is missing; recording another stage must still work.
    (ab / "dvc.yaml").write_text(DVC_YAML + "  c:\n    cmd: echo c\n    outs:\n      - data/lake/c\n")
    write(ab / "data/lake/c", {"z.txt": b"c\n"})
    shutil.rmtree(ab / "data/lake/a")
    assert record_version(ab, "c").nfiles == 1
    assert current_version(ab, "b") is None


def test_init_dvc_is_idempotent_and_keeps_user_default_remote(tmp_path: Path):
    root = tmp_path / "proj"
    root.mkdir()
    init_dvc(root)
    config = (root / ".dvc/config").read_text()
    # Relative to .dvc/, so the config holds in every clone.
    assert "url = ../data/dvc-remote" in config and (root / "data/dvc-remote").is_dir()
    init_dvc(root)
    assert (root / ".dvc/config").read_text() == config

    other = tmp_path / "other"
    other.mkdir()
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=other, check=True)
    subprocess.run([DVC, "remote", "add", "-d", "mine", "s3://bucket/x"], cwd=other, check=True)
    config = (other / ".dvc/config").read_text()
    init_dvc(other, remote_url=tmp_path / "remote")
    assert (other / ".dvc/config").read_text() == config


def test_init_dvc_in_git_repo_uses_git(tmp_path: Path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    init_dvc(tmp_path)
    assert "no_scm" not in (tmp_path / ".dvc/config").read_text()
