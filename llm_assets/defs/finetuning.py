"""Group `training`, post-training: lora_checkpoint (instruction tuning with a PEFT adapter) and
aligned_checkpoint (DPO with the LoRA model as the frozen reference).

Both train in the step's own process (the multiprocess executor gives each step one): unlike
pretraining they need no torchrun. Checkpoints go to `data/lake/.work/<asset>/` so a re-run after a
crash resumes; the artifact appears only when training and merging have finished.
"""

from dataclasses import asdict

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.posttrain.align import DpoSettings, train_dpo
from llm_assets.lib.common.report import lines_png, markdown_table, png_markdown
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.posttrain.sft import SftSettings, train_sft
from llm_assets.lib.pretrain.model_dir import adapter_dir, merged_dir


class LoraCheckpointConfig(dg.Config, SftSettings):
    """lora_checkpoint's launchpad: the fine-tuning settings of lib/posttrain/sft.py, as they are."""


class AlignedCheckpointConfig(dg.Config, DpoSettings):
    """aligned_checkpoint's launchpad: the DPO settings of lib/posttrain/align.py plus the quality bar."""

    min_accuracy: float = Field(0.70, description="Quality bar: the aligned model's held-out preference accuracy.")
    min_gain_over_lora: float = Field(0.10, description="Quality bar: accuracy points the aligned model gains over the LoRA model.")


def _log(context: dg.AssetExecutionContext):
    import json

    return lambda event: context.log.info(json.dumps(event))


def _curve(history: list[dict], key: str, eval_key: str, title: str, ylabel: str, hlines=None) -> str:
    train = [r for r in history if key in r]
    held = [r for r in history if eval_key in r]
    png = lines_png({"train": ([r["step"] for r in train], [r[key] for r in train]),
                     "held out": ([r["step"] for r in held], [r[eval_key] for r in held])},
                    title, "optimizer step", ylabel, hlines)
    return png_markdown(png, title)


@dg.asset(
    group_name="training",
    kinds={"pytorch", "peft", "dvc"},
    deps=["sft_dataset", "base_checkpoint"],
    check_specs=[dg.AssetCheckSpec(
        "lora_improves_reply_loss", asset="lora_checkpoint",
        description="Held-out response loss after fine-tuning is below the base model's.")],
)
def lora_checkpoint(context: dg.AssetExecutionContext, config: LoraCheckpointConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The base checkpoint instruction-tuned with a PEFT adapter (LoRA; QLoRA or IA3 by config), loss
    on the response tokens only. `adapter/` holds the adapter, `merged/` the adapter folded into
    fp32 weights: a plain model that `AutoModelForCausalLM.from_pretrained` loads."""
    settings = settings_of(config, SftSettings)
    settings.validate()  # a bad config fails here, naming the field, before anything loads
    data = lake.artifact_dir("sft_dataset")
    train, held_out = (posttrain_data.read_chats(data, s) for s in ("train", "validation"))
    out = lake.artifact_dir("lora_checkpoint")
    with lake.write("lora_checkpoint") as staging:
        result = train_sft(settings, lake.artifact_dir("base_checkpoint"), train, held_out,
                           lake.work_dir("lora_checkpoint"), staging, log=_log(context))
    version = lake.record("lora_checkpoint")
    m = result.metrics
    improved = m.eval_reply_loss_after < m.eval_reply_loss_before
    rows = [("method", m.method), ("trainable parameters", m.trainable_parameters),
            ("share of all parameters", f"{m.trainable_share:.2%}"),
            ("held-out response loss, base", m.eval_reply_loss_before),
            ("held-out response loss, fine-tuned", m.eval_reply_loss_after),
            ("training examples / epochs", f"{m.train_examples} / {m.epochs:.2f}"),
            ("training time (s)", m.train_seconds)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **asdict(m),  # every figure a number or text: the UI charts the numbers across runs
            "adapter_path": dg.MetadataValue.path(str(adapter_dir(out))),
            "merged_path": dg.MetadataValue.path(str(merged_dir(out))),
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], rows)),
            "loss_curve": dg.MetadataValue.md(_curve(
                result.history, "loss", "eval_loss", "instruction tuning loss (response tokens)", "loss (nats/token)",
                {"base, held out": m.eval_reply_loss_before})),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="lora_improves_reply_loss", passed=improved, severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": m.eval_reply_loss_before, "observed": m.eval_reply_loss_after})],
    )


@dg.asset(
    group_name="training",
    kinds={"pytorch", "trl", "dvc"},
    deps=["preference_dataset", "lora_checkpoint", "base_checkpoint"],
    check_specs=[dg.AssetCheckSpec(
        "aligned_preference_accuracy", asset="aligned_checkpoint",
        description="Held-out preference accuracy reaches min_accuracy and beats the LoRA model's by min_gain_over_lora.")],
)
def aligned_checkpoint(context: dg.AssetExecutionContext, config: AlignedCheckpointConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The LoRA model aligned with DPO (TRL's DPOTrainer) on preference pairs, the LoRA model itself
    as the frozen reference; saved as adapter and merged fp32 model. Metadata compares the held-out
    preference accuracy of the base, LoRA and aligned models."""
    settings = settings_of(config, DpoSettings)
    settings.validate()
    data = lake.artifact_dir("preference_dataset")
    train, held_out = (posttrain_data.read_preferences(data, s) for s in ("train", "validation"))
    out = lake.artifact_dir("aligned_checkpoint")
    with lake.write("aligned_checkpoint") as staging:
        result = train_dpo(settings, merged_dir(lake.artifact_dir("lora_checkpoint")), train, held_out,
                           lake.work_dir("aligned_checkpoint"), staging, log=_log(context),
                           compare={"base": lake.artifact_dir("base_checkpoint")})
    version = lake.record("aligned_checkpoint")
    m = result.metrics
    accuracy, gain = m.preference_accuracy["aligned"], m.accuracy_gain_over_lora
    rows = [(name, f"{s.accuracy:.1%}", s.logp_chosen, s.logp_rejected, s.logp_margin)
            for name, s in result.scores.items()]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **m.as_dict(),  # every figure a number or text
            "adapter_path": dg.MetadataValue.path(str(adapter_dir(out))),
            "merged_path": dg.MetadataValue.path(str(merged_dir(out))),
            "preference_accuracy": dg.MetadataValue.md(
                f"Held-out pairs: {m.eval_pairs}. Accuracy = share of pairs whose chosen reply the model finds "
                "more likely than the rejected one.\n\n" + markdown_table(
                    ["model", "accuracy", "mean log p(chosen)", "mean log p(rejected)", "mean margin"], rows)),
            "loss_curve": dg.MetadataValue.md(_curve(result.history, "loss", "eval_loss", "DPO loss", "loss")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="aligned_preference_accuracy",
            passed=accuracy >= config.min_accuracy and gain >= config.min_gain_over_lora,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold_accuracy": config.min_accuracy, "observed_accuracy": accuracy,
                      "threshold_gain": config.min_gain_over_lora, "observed_gain": gain,
                      "lora_accuracy": m.preference_accuracy["lora"]})],
    )
