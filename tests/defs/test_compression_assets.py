"""distilled_model and pruned_model on the tiny config, evaluated by eval_report beside the quantized
model, and release picking among them by release_rule (the default still releases the quantized model)."""

import json

import dagster as dg
import pytest

from helpers import POST, UPSTREAM, lock_md5, materialize, metadata
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.release import current_release

CANDIDATES = ["distilled_model", "pruned_model"]
RELEASE = ["reward_model", "quantized_model", *CANDIDATES, "eval_report", "release"]


def config(tiny_config, assets=None, rule="quantized") -> dict:
    cfg = tiny_config(assets)
    ops = cfg["ops"]
    for name in CANDIDATES:
        if name in ops:
            ops[name]["config"]["perplexity_budget"] = 10.0  # an untrained tiny student: let the rule decide
    if "quantized_model" in ops:
        ops["quantized_model"]["config"]["perplexity_budget"] = 1.0
    if "eval_report" in ops:  # as test_release_assets: a 30-step tiny model's alignment is noise
        ops["eval_report"]["config"].update(min_win_rate=0.0, min_rouge_ratio=0.0, max_empty_generations=3,
                                            max_token_run=1000, candidates=["distilled", "pruned"])
    ops["release"] = {"config": {"release_rule": rule}}
    return cfg


@pytest.fixture(scope="module")
def built(project_factory, tiny_config):
    project = project_factory("compression")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, config(tiny_config), [*UPSTREAM, "base_checkpoint", *POST, *RELEASE], instance)
    return project, instance, result


@pytest.mark.slow
def test_candidates_report_themselves_and_the_default_release_is_the_quantized_model(built):
    project, instance, result = built
    assert result.success
    d, p = metadata(instance, "distilled_model"), metadata(instance, "pruned_model")
    assert d["student_layers"] == 1 < d["teacher_layers"] and d["parameter_ratio"] < 1 and d["size_ratio"] < 1
    assert d["perplexity_ratio"] > 0 and d["speedup"] > 0 and "rouge_l_gap" in d and "| tokens/s" in d["comparison"]
    assert p["heads_after"] < p["heads_before"] and p["ffn_channels_after"] < p["ffn_channels_before"]
    assert p["size_ratio"] < 1 and p["perplexity_recovered"] > 0
    assert load_model(project / "data/lake/pruned_model").config.num_attention_heads == p["heads_after"]
    for name in CANDIDATES:
        assert lock_md5(project, name) == metadata(instance, name)["dvc_md5"]
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["distilled_perplexity_within_budget"] and checks["pruned_perplexity_within_budget"]

    report = json.loads((project / "data/lake/eval_report/report.json").read_text())
    assert set(report["candidates"]) == {"quantized", "distilled", "pruned"} <= set(report["figures"])
    assert [g["name"] for g in report["candidates"]["quantized"]["gates"]] == [g["name"] for g in report["gates"]]
    table = metadata(instance, "eval_report")["candidates"]
    assert all(f"| {n} |" in table for n in ("quantized", "distilled", "pruned")) and "tokens/s" in table

    current = current_release(project / "data/releases")
    assert current["model"] == "quantized_model" == metadata(instance, "release")["model"]
    assert current["version"] == lock_md5(project, "quantized_model")


@pytest.mark.slow
def test_fastest_passing_releases_the_fastest_candidate_through_its_own_gates(built, tiny_config):
    project, instance, first = built
    assert first.success
    result = materialize(project, config(tiny_config, ["release"], rule="fastest_passing"), ["release"], instance)
    assert result.success
    report = json.loads((project / "data/lake/eval_report/report.json").read_text())
    fastest = max(report["candidates"], key=lambda n: report["figures"][n]["tokens_per_second"])
    asset = {"quantized": "quantized_model", "distilled": "distilled_model", "pruned": "pruned_model"}[fastest]
    current = current_release(project / "data/releases")
    assert (current["model"], current["release_rule"], current["version"]) == (asset, "fastest_passing",
                                                                               lock_md5(project, asset))
    names = {g["name"] for g in current["gates"]}
    assert "aligned_beats_lora" in names and len(names) == len(current["gates"]) == 4
    assert "| distilled |" in metadata(instance, "release")["candidates"]
