"""Group `training`, post-training: lora_checkpoint (instruction tuning with a PEFT adapter) and
aligned_checkpoint (DPO with the LoRA model as the frozen reference).

Both train in the step's own process (the multiprocess executor gives each step one): unlike
pretraining they need no torchrun. Checkpoints go to `data/lake/.work/<asset>/` so a re-run after a
crash resumes; the artifact appears only when training and merging have finished.
"""

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.posttrain import adapters, posttrain_data
from llm_assets.lib.posttrain.align import DpoSettings, train_dpo
from llm_assets.lib.common.report import lines_png, markdown_table, png_markdown
from llm_assets.lib.posttrain.sft import SftSettings, train_sft

_S, _D, _A = SftSettings(), DpoSettings(), adapters.AdapterSettings()


class LoraConfig(dg.Config):
    method: str = Field(_A.method, description="lora | qlora (the base loaded in 4-bit NF4 by bitsandbytes) | ia3.")
    r: int = Field(_A.r, description="LoRA rank.")
    alpha: int = Field(_A.alpha, description="LoRA alpha: updates are scaled by alpha / r.")
    dropout: float = Field(_A.dropout, description="Dropout on the LoRA input path.")
    target_modules: list[str] = Field(list(_A.target_modules), description=f"Linear layers LoRA adapts, from {adapters.LLAMA_LINEAR}.")
    max_len: int = Field(_S.max_len, description="Tokens per example, prompt and reply; longer examples are dropped and counted.")
    max_steps: int = Field(_S.max_steps, description="Optimizer steps.")
    batch_size: int = Field(_S.batch_size, description="Examples per step.")
    lr: float = Field(_S.lr, description="Peak AdamW learning rate (cosine decay after warmup).")
    warmup_steps: int = Field(_S.warmup_steps, description="Linear warmup steps.")
    eval_every: int = Field(_S.eval_every, description="Steps between held-out evaluations (the loss curve's points).")
    eval_examples: int = Field(_S.eval_examples, description="Held-out examples scored before, during and after training (0 = all).")
    save_every: int = Field(_S.save_every, description="Steps between resumable checkpoints.")
    seed: int = Field(_S.seed, description="Seeds the adapter's initialization and the data order.")

    def settings(self) -> SftSettings:
        adapter = adapters.AdapterSettings(self.method, self.r, self.alpha, self.dropout, list(self.target_modules))
        return SftSettings(adapter=adapter, **self.model_dump(exclude={"method", "r", "alpha", "dropout", "target_modules"}))


class DpoConfig(dg.Config):
    beta: float = Field(_D.beta, description="DPO beta: how strongly the policy is held near the reference (the LoRA model).")
    r: int = Field(_D.adapter.r, description="Rank of the LoRA adapter DPO trains.")
    alpha: int = Field(_D.adapter.alpha, description="Its alpha (updates scaled by alpha / r).")
    dropout: float = Field(_D.adapter.dropout, description="Its dropout.")
    max_len: int = Field(_D.max_len, description="Tokens per prompt + reply; pairs with a longer side are dropped and counted.")
    max_steps: int = Field(_D.max_steps, description="Optimizer steps.")
    batch_size: int = Field(_D.batch_size, description="Preference pairs per step.")
    lr: float = Field(_D.lr, description="Peak learning rate (TRL's default 1e-6 barely moves a small model).")
    warmup_steps: int = Field(_D.warmup_steps, description="Linear warmup steps.")
    eval_every: int = Field(_D.eval_every, description="Steps between held-out evaluations.")
    eval_pairs: int = Field(_D.eval_pairs, description="Held-out pairs scored (0 = all).")
    save_every: int = Field(_D.save_every, description="Steps between resumable checkpoints.")
    seed: int = Field(_D.seed, description="Seeds the adapter's initialization and the data order.")
    min_accuracy: float = Field(0.70, description="Quality bar: the aligned model's held-out preference accuracy.")
    min_gain_over_lora: float = Field(0.10, description="Quality bar: accuracy points the aligned model gains over the LoRA model.")

    def settings(self) -> DpoSettings:
        adapter = adapters.AdapterSettings("lora", self.r, self.alpha, self.dropout)
        return DpoSettings(adapter=adapter, **self.model_dump(
            exclude={"r", "alpha", "dropout", "min_accuracy", "min_gain_over_lora"}))


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
def lora_checkpoint(context: dg.AssetExecutionContext, config: LoraConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The base checkpoint instruction-tuned with a PEFT adapter (LoRA; QLoRA or IA3 by config), loss
    on the response tokens only. `adapter/` holds the adapter, `merged/` the adapter folded into
    fp32 weights: a plain model that `AutoModelForCausalLM.from_pretrained` loads."""
    settings = config.settings()
    settings.validate()  # a bad config fails here, naming the field, before anything loads
    data = lake.artifact_dir("sft_dataset")
    train, held_out = (posttrain_data.read_chats(data / f"{s}.parquet") for s in ("train", "validation"))
    out = lake.artifact_dir("lora_checkpoint")
    with lake.write("lora_checkpoint") as staging:
        result = train_sft(settings, lake.artifact_dir("base_checkpoint"), train, held_out,
                           lake.work_dir("lora_checkpoint"), staging, log=_log(context))
    version = lake.record("lora_checkpoint")
    m = result["metrics"]
    improved = m["eval_reply_loss_after"] < m["eval_reply_loss_before"]
    rows = [("method", m["method"]), ("trainable parameters", m["trainable_parameters"]),
            ("share of all parameters", f"{m['trainable_share']:.2%}"),
            ("held-out response loss, base", m["eval_reply_loss_before"]),
            ("held-out response loss, fine-tuned", m["eval_reply_loss_after"]),
            ("training examples / epochs", f"{m['train_examples']} / {m['epochs']:.2f}"),
            ("training time (s)", m["train_seconds"])]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **{k: v for k, v in m.items() if isinstance(v, (int, float, str))},
            "adapter_path": dg.MetadataValue.path(str(out / "adapter")),
            "merged_path": dg.MetadataValue.path(str(out / "merged")),
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], rows)),
            "loss_curve": dg.MetadataValue.md(_curve(
                result["history"], "loss", "eval_loss", "instruction tuning loss (response tokens)", "loss (nats/token)",
                {"base, held out": m["eval_reply_loss_before"]})),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="lora_improves_reply_loss", passed=improved, severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": m["eval_reply_loss_before"], "observed": m["eval_reply_loss_after"]})],
    )


@dg.asset(
    group_name="training",
    kinds={"pytorch", "trl", "dvc"},
    deps=["preference_dataset", "lora_checkpoint", "base_checkpoint"],
    check_specs=[dg.AssetCheckSpec(
        "aligned_preference_accuracy", asset="aligned_checkpoint",
        description="Held-out preference accuracy reaches min_accuracy and beats the LoRA model's by min_gain_over_lora.")],
)
def aligned_checkpoint(context: dg.AssetExecutionContext, config: DpoConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The LoRA model aligned with DPO (TRL's DPOTrainer) on preference pairs, the LoRA model itself
    as the frozen reference; saved as adapter and merged fp32 model. Metadata compares the held-out
    preference accuracy of the base, LoRA and aligned models."""
    settings = config.settings()
    settings.validate()
    data = lake.artifact_dir("preference_dataset")
    train, held_out = (posttrain_data.read_preferences(data / f"{s}.parquet") for s in ("train", "validation"))
    out = lake.artifact_dir("aligned_checkpoint")
    with lake.write("aligned_checkpoint") as staging:
        result = train_dpo(settings, lake.artifact_dir("lora_checkpoint") / "merged", train, held_out,
                           lake.work_dir("aligned_checkpoint"), staging, log=_log(context),
                           compare={"base": lake.artifact_dir("base_checkpoint")})
    version = lake.record("aligned_checkpoint")
    m, scores = result["metrics"], result["scores"]
    accuracy, gain = m["aligned_preference_accuracy"], m["accuracy_gain_over_lora"]
    rows = [(name, f"{s['accuracy']:.1%}", s["logp_chosen"], s["logp_rejected"], s["logp_margin"])
            for name, s in scores.items()]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **{k: v for k, v in m.items() if isinstance(v, (int, float, str))},
            "adapter_path": dg.MetadataValue.path(str(out / "adapter")),
            "merged_path": dg.MetadataValue.path(str(out / "merged")),
            "preference_accuracy": dg.MetadataValue.md(
                f"Held-out pairs: {m['eval_pairs']}. Accuracy = share of pairs whose chosen reply the model finds "
                "more likely than the rejected one.\n\n" + markdown_table(
                    ["model", "accuracy", "mean log p(chosen)", "mean log p(rejected)", "mean margin"], rows)),
            "loss_curve": dg.MetadataValue.md(_curve(result["history"], "loss", "eval_loss", "DPO loss", "loss")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="aligned_preference_accuracy",
            passed=accuracy >= config.min_accuracy and gain >= config.min_gain_over_lora,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold_accuracy": config.min_accuracy, "observed_accuracy": accuracy,
                      "threshold_gain": config.min_gain_over_lora, "observed_gain": gain,
                      "lora_accuracy": m["lora_preference_accuracy"]})],
    )
