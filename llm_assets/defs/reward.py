"""Group `training`: reward_model, the instruction-tuned model with a scalar head trained on the
preference pairs (TRL's RewardTrainer). eval_report judges the aligned model's replies with it.

It trains in the step's own process (under torchrun with `nproc_per_node` > 1), checkpoints to
`data/lake/.work/reward_model/` so a re-run after a crash resumes, and the artifact appears only
once training and scoring have finished.
"""

import math
from dataclasses import asdict

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.defs.training import TorchrunConfig, post_train
from llm_assets.lib.common.report import lines_png, markdown_table, png_markdown
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.posttrain.reward import RewardSettings, rewards_scatter_markdown
from llm_assets.lib.pretrain.model_dir import merged_dir


class RewardModelConfig(TorchrunConfig, RewardSettings):
    """reward_model's launchpad: the settings of lib/posttrain/reward.py, the process count and the
    check's bar."""

    min_accuracy: float = Field(0.6, description="Check (WARN): held-out pairwise accuracy the reward model "
                                                 "should reach (0.5 = no better than a coin).")


def _loss_curve(history: list[dict], best_step: int) -> str:
    train = [r for r in history if "loss" in r]
    held = [r for r in history if "eval_loss" in r]
    png = lines_png({"train": ([r["step"] for r in train], [r["loss"] for r in train]),
                     "held out": ([r["step"] for r in held], [r["eval_loss"] for r in held])},
                    f"reward model pairwise loss (best step {best_step})", "optimizer step",
                    "-log sigmoid(r_chosen - r_rejected)", {"ln 2 (cannot tell the replies apart)": math.log(2)})
    return png_markdown(png, "reward model loss")


@dg.asset(
    group_name="training",
    kinds={"pytorch", "trl", "dvc"},
    deps=["preference_dataset", "lora_checkpoint"],
    check_specs=[dg.AssetCheckSpec(
        "reward_model_ranks_held_out_pairs", asset="reward_model",
        description="The reward model scores the chosen reply above the rejected one on at least min_accuracy "
                    "of the held-out preference pairs.")],
)
def reward_model(context: dg.AssetExecutionContext, config: RewardModelConfig, lake: LakeResource,
                 pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """A reward model: the instruction-tuned (LoRA, merged) model with a scalar head, fully fine-tuned
    with TRL's RewardTrainer so the chosen reply of a preference pair scores above the rejected one.
    A plain `AutoModelForSequenceClassification` directory with its tokenizer; metadata shows the
    held-out pairwise accuracy and the held-out rewards of chosen vs rejected replies."""
    settings = settings_of(config, RewardSettings)
    settings.validate()  # a bad config fails here, naming the field, before anything loads
    data = lake.artifact_dir("preference_dataset")
    train, held_out = (posttrain_data.read_preferences(data, s) for s in ("train", "validation"))
    out = lake.artifact_dir("reward_model")
    with lake.write("reward_model") as staging:
        result = post_train(context, pipes_subprocess_client, config.nproc_per_node, "reward", settings,
                            sft_dir=merged_dir(lake.artifact_dir("lora_checkpoint")), train_pairs=train,
                            eval_pairs=held_out, work_dir=lake.work_dir("reward_model"), out_dir=staging)
    version = lake.record("reward_model")
    m = result.metrics
    rows = [("held-out pairwise accuracy", f"{m.eval_accuracy:.1%}"),
            ("before training (random head)", f"{m.eval_accuracy_before:.1%}"),
            ("mean reward, chosen / rejected", f"{m.mean_chosen_reward:.3f} / {m.mean_rejected_reward:.3f}"),
            ("mean margin", m.mean_margin),
            ("pairs: training / held out / left out", f"{m.train_pairs} / {m.eval_pairs} / {m.dropped_too_long}"),
            ("best step / steps run / epochs", f"{m.best_step} / {m.steps} / {m.epochs:.2f}"),
            ("best / last held-out loss", f"{m.best_eval_loss:.4f} / {m.last_eval_loss:.4f}"),
            ("held-out loss rose from step (-1: never)", m.overfitting_from_step),
            ("training time (s)", m.train_seconds)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **asdict(m),  # every figure a number or text: the UI charts the numbers across runs
            "processes": config.nproc_per_node,
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], rows)),
            "held_out_rewards": dg.MetadataValue.md(rewards_scatter_markdown(
                result.chosen_rewards, result.rejected_rewards,
                f"held-out pairs: accuracy {m.eval_accuracy:.1%} (points above the line are right)")),
            "loss_curve": dg.MetadataValue.md(_loss_curve(result.history, m.best_step)),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="reward_model_ranks_held_out_pairs", passed=m.eval_accuracy >= config.min_accuracy,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": config.min_accuracy, "observed": m.eval_accuracy,
                      "eval_pairs": m.eval_pairs})],
    )
