import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import dead_pid
from llm_assets.lib.common.atomic import atomic_dir, owner, owner_gone, sweep_dir, sweep_leftovers


def test_success_replaces_previous_version(tmp_path: Path):
    target = tmp_path / "lake" / "asset"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["asset"]  # no staging/trash left


def test_failure_keeps_previous_version_and_leaves_nothing(tmp_path: Path):
    target = tmp_path / "asset"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half written")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]


def test_failure_on_first_write_leaves_no_artifact(tmp_path: Path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "asset") as tmp:
            (tmp / "part.parquet").write_bytes(b"\0" * 10)
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_staging_is_named_after_its_writer(tmp_path: Path):
    with atomic_dir(tmp_path / "asset") as tmp:
        assert tmp.name.startswith(f".staging-asset-{owner()}-")


# Writes into a staging directory, then dies by SIGKILL before the rename, as a killed run does.
KILLED_WRITER = """
import os, signal, sys
from llm_assets.lib.common.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as staging:
    (staging / "part.bin").write_bytes(b"half written")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_staging_goes_at_the_next_sweep(tmp_path: Path):
    target = tmp_path / "asset"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".staging-asset-")
    assert sweep_leftovers(target) == [left]  # at once, not after an hour
    assert list(tmp_path.iterdir()) == []


def test_sweep_keeps_live_writers_and_young_leftovers_of_unknown_writers(tmp_path: Path):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        names = {
            "dead": f".staging-asset-{dead_pid()}@{host}-0123abcd",
            "dead_trash": f".trash-asset-{dead_pid()}@{host}-4567abcd",
            "this_process": f".staging-asset-{owner()}-89abcdef",
            "live": f".staging-asset-{live.pid}@{host}-0000aaaa",
            "other_host": f".staging-asset-{dead_pid()}@elsewhere-1111bbbb",  # pid cannot be checked
            "other_host_old": f".staging-asset-{dead_pid()}@elsewhere-2222cccc",
            "unowned_old": ".staging-asset-3333dddd",  # named before writers were recorded
            "unowned": ".staging-asset-4444eeee",
            "other_target": f".staging-asset-two-{dead_pid()}@{host}-5555ffff",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
        for old in ("other_host_old", "unowned_old"):
            os.utime(tmp_path / names[old], (0, 0))
        removed = sweep_leftovers(tmp_path / "asset")
        assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "dead_trash", "other_host_old", "unowned_old"))
        # A work directory is swept whole: every target's leftovers whose writer is gone.
        assert sweep_dir(tmp_path) == [tmp_path / names["other_target"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("this_process", "live", "other_host", "unowned"))
    finally:
        live.kill()
        live.wait()


def test_owner_gone_tells_exited_reused_and_unknown_owners():
    host = socket.gethostname()
    assert owner_gone(owner(), time.time()) is False
    assert owner_gone(f"{dead_pid()}@{host}", time.time()) is True
    newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert owner_gone(f"{newcomer.pid}@{host}", time.time()) is False
        # The owner was at work a minute before this process started: its pid was reused.
        assert owner_gone(f"{newcomer.pid}@{host}", time.time() - 60) is True
        newcomer.kill()
        time.sleep(0.2)
        assert owner_gone(f"{newcomer.pid}@{host}", time.time()) is True  # a zombie, not reaped yet
    finally:
        newcomer.kill()
        newcomer.wait()
    assert owner_gone(f"{os.getpid()}@another-host", 0) is None
    assert owner_gone("not a tag", 0) is None
