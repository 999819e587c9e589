"""quantized_model, eval_report and release on the tiny config: a release when the gates pass, the
previous release kept when one fails (in the same run, and when release is started on its own)."""

import json

import dagster as dg
import pytest
from transformers import AutoTokenizer

from helpers import POST, UPSTREAM, lock_md5, materialize, metadata
from llm_assets.cli import refused_gates
from llm_assets.lib.release.quantize import load_quantized
from llm_assets.lib.release.release import Gate, current_release, history, publish, rollback

RELEASE = ["reward_model", "quantized_model", "eval_report", "release"]


def config(tiny_config, budget: float, assets=None) -> dict:
    cfg = tiny_config(assets)
    cfg["ops"]["quantized_model"]["config"]["perplexity_budget"] = budget
    # A 30-step tiny model's DPO is noise and it often generates nothing: open those two gates so
    # each test decides the outcome through the perplexity gate alone.
    if "eval_report" in cfg["ops"]:
        cfg["ops"]["eval_report"]["config"].update(min_win_rate=0.0, min_rouge_ratio=0.0, max_empty_generations=3, max_token_run=1000)
    return cfg


@pytest.fixture(scope="module")
def released(project_factory, tiny_config):
    project = project_factory("release")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, config(tiny_config, 1.0), [*UPSTREAM, "base_checkpoint", *POST, *RELEASE], instance)
    return project, instance, result


def test_gates_pass_and_the_release_points_at_the_quantized_model(released):
    project, instance, result = released
    assert result.success
    q = metadata(instance, "quantized_model")
    assert q["method"] == "nf4" and 0 < q["disk_ratio"] < 1
    assert q["perplexity_ratio"] == pytest.approx(q["val_perplexity"] / q["aligned_val_perplexity"])
    model = load_quantized(project / "data/lake/quantized_model")
    tok = AutoTokenizer.from_pretrained(project / "data/lake/quantized_model")
    out = model.generate(tok("def f", return_tensors="pt")["input_ids"], max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2

    report = json.loads((project / "data/lake/eval_report/report.json").read_text())
    assert set(report["figures"]) == {"base", "lora", "aligned", "quantized"}
    e = metadata(instance, "eval_report")
    for name in ("base", "lora", "aligned", "quantized"):
        for key in ("val_perplexity", "instruction_loss", "preference_accuracy", "rouge_l", "latency_ms_per_token_p50",
                    "latency_ms_per_token_p95", "tokens_per_second", "peak_memory_bytes", "parameters", "disk_bytes"):
            assert e[f"{name}_{key}"] == report["figures"][name][key], (name, key)
        assert e[f"{name}_latency_ms_per_token_p95"] >= e[f"{name}_latency_ms_per_token_p50"] > 0
    assert e["quantized_disk_bytes"] < e["aligned_disk_bytes"]
    assert e["quantized_parameters"] == e["aligned_parameters"]
    assert "| quantized |" in e["comparison"] and e["plot"].startswith("![")
    assert (project / "data/lake/eval_report/report.md").read_text().startswith("# Evaluation report")
    assert lock_md5(project, "eval_report") == e["dvc_md5"]

    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["quantized_perplexity_within_budget"] and checks["generation_non_empty"]
    current = current_release(project / "data/releases")
    assert current["version"] == lock_md5(project, "quantized_model") == metadata(instance, "release")["version"]
    assert (project / "data/releases" / current["version"] / "model.safetensors").is_file()
    assert {g["name"] for g in current["gates"]} == {
        "quantized_perplexity_within_budget", "aligned_beats_lora", "generation_non_empty", "replies_do_not_loop"}


def test_release_with_a_canary_share_makes_the_candidate_the_canary(released, tmp_path):
    project, instance, first = released
    assert first.success
    releases = project / "data/releases"
    candidate = current_release(releases)["version"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    publish(tmp_path / "old", releases, "old", [Gate("g", True, 0, 0)], {})  # another release is current
    try:
        cfg = {"ops": {"release": {"config": {"canary_share": 0.25}}}}
        assert materialize(project, cfg, ["release"], instance).success
        pointer = current_release(releases)
        assert pointer["version"] == "old"
        assert pointer["canary"] == {"version": candidate, "path": str(releases / candidate), "share": 0.25}
        md = metadata(instance, "release")
        assert (md["version"], md["canary_version"], md["canary_share"]) == ("old", candidate, 0.25)
        assert history(releases)[-1]["event"] == "canary"
    finally:
        rollback(releases, candidate)  # the tests below start from the candidate, released


def test_a_failed_gate_keeps_the_previous_release(released, tiny_config):
    project, instance, first = released
    assert first.success
    before = current_release(project / "data/releases")
    # a budget no quantized model meets: the blocking check fails, eval_report and release are skipped
    gated = RELEASE[1:]  # reward_model is built already
    result = materialize(project, config(tiny_config, -0.5, gated), gated, instance)
    assert not result.success
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "quantized_perplexity_within_budget")
    assert not check.passed and check.blocking
    assert [(k.to_user_string(), c) for k, c in refused_gates(result)] == [
        ("quantized_model", "quantized_perplexity_within_budget")]  # `llm-assets materialize` reports a refusal
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"quantized_model"}  # eval_report and release did not run
    assert current_release(project / "data/releases") == before

    # release started on its own re-reads the gates from the artifacts and refuses too
    result = materialize(project, {}, ["release"], instance)
    assert not result.success
    assert refused_gates(result) == []  # a failed step without a failed check is an error, not a refusal
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    why = failure.step_failure_data.user_failure_data.description
    assert why.startswith(f"release refused, the current release stays {before['version']}: failed "
                          "quantized_perplexity_within_budget")
    assert current_release(project / "data/releases") == before
    assert history(project / "data/releases")[-1]["event"] == "refused"


def test_eval_report_measures_a_released_version_beside_the_candidates(released, tiny_config):
    project, instance, first = released
    assert first.success
    current = current_release(project / "data/releases")
    cfg = tiny_config(["eval_report"])
    cfg["ops"]["eval_report"]["config"].update(min_win_rate=0.0, min_rouge_ratio=0.0, max_empty_generations=3,
                                               max_token_run=1000, model_version="current")
    assert materialize(project, cfg, ["eval_report"], instance).success
    e = metadata(instance, "eval_report")
    report = json.loads((project / "data/lake/eval_report/report.json").read_text())
    assert e["release_version"] == report["release_version"] == current["version"]
    assert set(report["figures"]) == {"base", "lora", "aligned", "quantized", "release"}
    assert "| release |" in e["comparison"] and all("release" in s for s in report["samples"])
    # the release is a copy of the quantized model: the same weights score the same perplexity
    assert e["release_val_perplexity"] == pytest.approx(e["quantized_val_perplexity"], rel=1e-6)
    assert e["release_parameters"] == e["aligned_parameters"]

    cfg["ops"]["eval_report"]["config"]["model_version"] = "canary"
    result = materialize(project, cfg, ["eval_report"], instance)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "the release pointer names no canary release" in failure.step_failure_data.user_failure_data.description
