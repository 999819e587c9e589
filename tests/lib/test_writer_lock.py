"""Writer locks between real processes: the second writer is refused naming the first, a SIGKILL
frees the lock at once, and a writer allowed to wait gets the lock when the holder lets go."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_assets.lib.common.writer_lock import AssetBusy, WriterLocks

HOLDER = """
import sys, time
from llm_assets.lib.common.writer_lock import WriterLocks
locks = WriterLocks(sys.argv[1], "run aaaa1111")
locks.hold("raw_corpus")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
locks.release_all()
print("released", flush=True)
time.sleep(60)
"""


def start_holder(lock_dir: Path, hold_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(hold_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_sigkill_frees_the_lock(tmp_path):
    holder = start_holder(tmp_path, hold_s=60)
    try:
        with pytest.raises(AssetBusy) as refused:
            WriterLocks(tmp_path, "run bbbb2222").hold("raw_corpus")
        assert f"raw_corpus is being written by run aaaa1111 (pid {holder.pid} on " in str(refused.value)
        WriterLocks(tmp_path, "run bbbb2222").hold("clean_corpus")  # one lock per asset
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    mine = WriterLocks(tmp_path, "run bbbb2222")
    mine.hold("raw_corpus")
    assert (tmp_path / "raw_corpus.holder").read_text().startswith("run bbbb2222 (pid ")
    mine.release_all()
    assert not (tmp_path / "raw_corpus.holder").exists()


def test_a_writer_allowed_to_wait_gets_the_lock_when_the_holder_lets_go(tmp_path):
    holder = start_holder(tmp_path, hold_s=1.0)
    heard: list[str] = []
    try:
        start = time.monotonic()
        WriterLocks(tmp_path, "run bbbb2222", wait_s=30, on_wait=heard.append).hold("raw_corpus")
        waited = time.monotonic() - start
        assert holder.stdout.readline() == "released\n"
    finally:
        holder.kill()
        holder.wait()
    assert 0.3 < waited < 20
    [message] = heard
    assert "being written by run aaaa1111" in message and "waiting up to 30 s" in message


def test_a_writer_that_waited_too_long_is_refused_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path, hold_s=60)
    try:
        with pytest.raises(AssetBusy, match=r"by run aaaa1111 .*; waited 0.2 s"):
            WriterLocks(tmp_path, "run bbbb2222", wait_s=0.2).hold("raw_corpus")
    finally:
        holder.kill()
        holder.wait()
