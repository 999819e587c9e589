"""Project directories: the one place that names them agrees with dvc.yaml and .gitignore."""

from pathlib import Path

import pytest
import yaml

from llm_assets.lib.common.paths import PROJECT_DIR_ENV, ProjectPaths, default_project_dir

REPO = Path(__file__).resolve().parents[2]
NAMED = ("raw", "sft", "preferences", "incoming", "lake", "serving", "releases", "remote")


def test_every_directory_is_a_distinct_folder_under_data(tmp_path):
    p = ProjectPaths(tmp_path)
    dirs = [getattr(p, name) for name in NAMED]
    assert all(d.parent == tmp_path / "data" for d in dirs)
    assert len(set(dirs)) == len(NAMED)
    assert p.releases == tmp_path / "data" / "releases" and p.serving == tmp_path / "data" / "serving"
    assert set(p.user_dirs()) == {p.raw, p.incoming, p.lake}


def test_a_string_root_is_a_path():
    assert ProjectPaths("proj").artifact("tokenizer") == Path("proj/data/lake/tokenizer")


def test_artifacts_are_the_directories_dvc_yaml_versions():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    p = ProjectPaths(REPO)
    for stage, spec in stages.items():
        assert spec["outs"] == [p.artifact(stage).relative_to(REPO).as_posix()], stage


def test_work_dirs_stay_out_of_every_artifact_and_out_of_git():
    p = ProjectPaths(REPO)
    work = p.work("base_checkpoint")
    assert work.parent.name.startswith(".")  # a dot dir: never read as an artifact or a batch
    assert work.is_relative_to(p.lake) and not work.is_relative_to(p.artifact("base_checkpoint"))
    ignored = (REPO / ".gitignore").read_text().splitlines()
    for generated in (p.lake, p.serving, p.releases, p.remote):
        assert f"/{generated.relative_to(REPO).as_posix()}/" in ignored, generated


def test_default_project_dir_is_the_env_var_else_this_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(PROJECT_DIR_ENV, str(tmp_path / "elsewhere" / ".." / "proj"))
    assert default_project_dir() == (tmp_path / "proj").resolve()
    monkeypatch.delenv(PROJECT_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    assert default_project_dir() == REPO  # the editable install's checkout, not the cwd


@pytest.mark.parametrize("asset", ["raw_corpus", "lora_checkpoint"])
def test_artifact_and_work_dirs_are_named_after_the_asset(tmp_path, asset):
    p = ProjectPaths(tmp_path)
    assert p.artifact(asset).name == asset == p.work(asset).name
