from pathlib import Path

import pytest

from llm_assets.lib.common.atomic import atomic_dir


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


def test_sweep_removes_only_old_leftovers_of_that_target(tmp_path: Path):
    import os

    from llm_assets.lib.common.atomic import sweep_leftovers

    old = tmp_path / ".staging-asset-dead1234"
    fresh = tmp_path / ".staging-asset-live5678"
    other = tmp_path / ".staging-other-dead0000"
    for d in (old, fresh, other):
        d.mkdir()
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    assert sweep_leftovers(tmp_path / "asset") == [old]
    assert fresh.exists() and other.exists()
