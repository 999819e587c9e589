"""Run-config files: merged per section, cut down to the selected assets, overridden on top."""

from pathlib import Path

import pytest

from llm_assets.lib.common.run_config import (CONFIG_ENV, DEFAULT_AUTOMATION_CONFIG, automation_paths,
                                              for_automation, merge)

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def two_files(tmp_path):
    demo = write(tmp_path / "demo.yaml", "ops:\n  tokenizer: {config: {vocab_size: 8192}}\n"
                 "  raw_corpus: {config: {include_stdlib: true}}\nexecution: {config: {multiprocess: {}}}\n")
    mine = write(tmp_path / "mine.yaml", "ops:\n  tokenizer: {config: {vocab_size: 512}}\nloggers: {}\n")
    return demo, mine


def test_later_files_win_per_asset_and_other_assets_are_dropped(two_files):
    demo, mine = two_files
    merged = merge([demo, mine], {"tokenizer", "base_checkpoint"})
    assert merged["ops"] == {"tokenizer": {"config": {"vocab_size": 512}}}  # raw_corpus: not in the run
    assert merged["execution"] == {"config": {"multiprocess": {}}} and merged["loggers"] == {}


def test_a_later_file_overrides_field_by_field(tmp_path):
    demo = write(tmp_path / "demo.yaml", "ops:\n  aligned_checkpoint: {config: {objective: grpo, max_steps: 40}}\n")
    mine = write(tmp_path / "steps.yaml", "ops:\n  aligned_checkpoint: {config: {max_steps: 120}}\n")
    merged = merge([demo, mine], {"aligned_checkpoint"})
    assert merged["ops"]["aligned_checkpoint"]["config"] == {"objective": "grpo", "max_steps": 120}


def test_overrides_go_on_top_field_by_field(two_files):
    demo, _ = two_files
    merged = merge([demo], {"tokenizer", "raw_corpus"},
                   overrides={"tokenizer": {"min_frequency": 3}, "base_checkpoint": {"max_steps": 2}})
    assert merged["ops"]["tokenizer"]["config"] == {"vocab_size": 8192, "min_frequency": 3}
    assert merged["ops"]["raw_corpus"]["config"] == {"include_stdlib": True}
    assert merged["ops"]["base_checkpoint"] == {"config": {"max_steps": 2}}  # an override selects its asset


def test_no_files_and_an_empty_file_give_empty_config(tmp_path):
    assert merge([], {"tokenizer"}) == {}
    assert merge([write(tmp_path / "empty.yaml", "")], {"tokenizer"}) == {}


def test_a_file_that_is_not_a_mapping_fails_naming_it(tmp_path):
    bad = write(tmp_path / "list.yaml", "- tokenizer\n")
    with pytest.raises(ValueError, match=r"list\.yaml: a run-config file must be a mapping, got list"):
        merge([bad], {"tokenizer"})


def test_automation_reads_the_env_var_paths_relative_to_the_project(tmp_path, monkeypatch, two_files):
    monkeypatch.setenv(CONFIG_ENV, "demo.yaml:mine.yaml")
    assert automation_paths(tmp_path) == [tmp_path / "demo.yaml", tmp_path / "mine.yaml"]
    assert for_automation(tmp_path, {"tokenizer"}) == {
        "ops": {"tokenizer": {"config": {"vocab_size": 512}}}, "execution": {"config": {"multiprocess": {}}},
        "loggers": {}}


def test_a_missing_env_var_file_fails_naming_it(tmp_path, monkeypatch, two_files):
    monkeypatch.setenv(CONFIG_ENV, "demo.yaml:gone.yaml")
    with pytest.raises(FileNotFoundError, match=r"names missing file\(s\): .*gone\.yaml"):
        automation_paths(tmp_path)


def test_without_the_env_var_the_demo_config_when_the_project_has_it(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert automation_paths(tmp_path) == []
    assert for_automation(tmp_path, {"tokenizer"}, {"tokenizer": {"vocab_size": 300}}) == {
        "ops": {"tokenizer": {"config": {"vocab_size": 300}}}}
    assert automation_paths(REPO) == [REPO / DEFAULT_AUTOMATION_CONFIG]
    demo = for_automation(REPO, {"raw_corpus", "drift_report", "tokenizer"})
    assert set(demo["ops"]) == {"raw_corpus", "drift_report"}  # demo.yaml leaves the tokenizer at its defaults
