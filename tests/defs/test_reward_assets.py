"""reward_model on the tiny config, materialized in-process after the assets it is trained from."""

import json

import dagster as dg
import pytest
from transformers import AutoModelForSequenceClassification

from helpers import UPSTREAM, lock_md5, materialize, metadata

SELECTION = [*UPSTREAM, "base_checkpoint", "sft_dataset", "preference_dataset", "lora_checkpoint", "reward_model"]


@pytest.fixture(scope="module")
def rewarded(project_factory, tiny_config):
    project = project_factory("reward")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, tiny_config(SELECTION), SELECTION, instance)
    return project, instance, result


def test_reward_model_saves_a_sequence_classifier_with_its_figures(rewarded):
    project, instance, result = rewarded
    assert result.success
    out = project / "data/lake/reward_model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "training_config.json",
                 "log_history.jsonl", "held_out_rewards.json"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1

    md = metadata(instance, "reward_model")
    figures = json.loads((out / "metrics.json").read_text())
    assert md["eval_accuracy"] == figures["eval_accuracy"] and 0 <= md["eval_accuracy"] <= 1
    assert md["eval_pairs"] == len(json.loads((out / "held_out_rewards.json").read_text())) > 0
    assert md["train_pairs"] > 0 and md["steps"] >= 1
    assert md["mean_margin"] == pytest.approx(md["mean_chosen_reward"] - md["mean_rejected_reward"])
    assert "held-out pairwise accuracy" in md["summary"]
    assert md["held_out_rewards"].startswith("![") and md["loss_curve"].startswith("![")
    assert md["dvc_md5"] == lock_md5(project, "reward_model")


def test_the_ranking_check_reports_threshold_and_observed(rewarded):
    _, instance, result = rewarded
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "reward_model_ranks_held_out_pairs")
    observed = metadata(instance, "reward_model")["eval_accuracy"]
    assert check.metadata["threshold"].value == 0.6 and check.metadata["observed"].value == observed
    assert check.passed == (observed >= 0.6)
    assert check.severity == dg.AssetCheckSeverity.WARN


def test_reward_model_sits_in_training_after_its_inputs_and_in_the_posttrain_and_retrain_jobs():
    from llm_assets.definitions import defs
    from llm_assets.defs.reward import RewardModelConfig
    from llm_assets.lib.common.settings import settings_of
    from llm_assets.lib.posttrain.reward import RewardSettings

    d = defs()
    node = d.resolve_asset_graph().get(dg.AssetKey("reward_model"))
    assert node.group_name == "training" and {"pytorch", "trl", "dvc"} <= set(node.kinds)
    assert {k.to_user_string() for k in node.parent_keys} == {"preference_dataset", "lora_checkpoint"}
    for job in ("posttrain_job", "retrain_job"):
        assert dg.AssetKey("reward_model") in d.resolve_job_def(job).asset_layer.selected_asset_keys, job
    assert settings_of(RewardModelConfig(), RewardSettings) == RewardSettings()
