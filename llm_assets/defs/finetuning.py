"""Group `training`, post-training: lora_checkpoint (instruction tuning with a PEFT adapter) and
aligned_checkpoint (DPO, or another offline preference objective, on top of the LoRA model).

Both train in the step's own process (the multiprocess executor gives each step one), or with
`nproc_per_node` > 1 under torchrun (workers/posttrain.py), as pretraining does. Checkpoints go to `data/lake/.work/<asset>/` so a re-run after a
crash resumes; the artifact appears only when training and merging have finished. Both keep the
checkpoint of the lowest held-out loss, not the last one; their metadata say at which step, and
whether (from which step) held-out loss rose while training loss still fell.
"""

from dataclasses import asdict

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.defs.training import TorchrunConfig, post_train
from llm_assets.lib.posttrain import generation, posttrain_data
from llm_assets.lib.posttrain.align import AlignSettings, OnlineData
from llm_assets.lib.common.report import lines_png, markdown_table, png_markdown
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.posttrain.sft import SftSettings
from llm_assets.lib.pretrain.model_dir import adapter_dir, context_length, merged_dir


class LoraCheckpointConfig(TorchrunConfig, SftSettings, generation.TuningSettings):
    """lora_checkpoint's launchpad: the fine-tuning settings of lib/posttrain/sft.py, the process
    count and how the merged model's generation_config.json is chosen (lib/posttrain/generation.py)."""


class AlignedCheckpointConfig(TorchrunConfig, AlignSettings, generation.TuningSettings):
    """aligned_checkpoint's launchpad: the alignment settings of lib/posttrain/align.py, the process
    count, the generation-config choice, and the quality bar."""

    min_accuracy: float = Field(0.70, description="Quality bar: the objective's own held-out accuracy (method_accuracy: "
                                                  "DPO's reward accuracy, ...) of the aligned model.")


def _tune(model_dir, chats: list[list[dict]], config) -> dict:
    """Choose and write model_dir's generation_config.json on held-out chats; its metadata."""
    chosen, rows = generation.tune_model_dir(model_dir, chats, settings_of(config, generation.TuningSettings))
    table = markdown_table(["repetition penalty", "no-repeat n-gram", "held-out ROUGE-L", "replies with a word 3x",
                            "longest token run", "mean reply chars"],
                           [(r["repetition_penalty"], r["no_repeat_ngram_size"], r["rouge_l"], r["repeats_share"],
                             r["longest_token_run"], r["mean_reply_chars"]) for r in rows])
    return {"generation_repetition_penalty": float(chosen.repetition_penalty),
            "generation_no_repeat_ngram_size": int(chosen.no_repeat_ngram_size),
            "generation_tuning_rouge_l": max(r["rouge_l"] for r in rows),
            "generation_config": dg.MetadataValue.md("generation_config.json chosen by held-out ROUGE-L (greedy):\n\n" + table)}


def _curve(history: list[dict], best_step: int, title: str, ylabel: str, hlines=None,
           keys: tuple[str, str] = ("loss", "eval_loss")) -> str:
    """Training and held-out figure (`keys`: loss by default) per step, the kept checkpoint marked."""
    train_key, held_key = keys
    train = [r for r in history if train_key in r]
    held = [r for r in history if held_key in r]
    best = [r for r in held if r["step"] == best_step]
    png = lines_png({"train": ([r["step"] for r in train], [r[train_key] for r in train]),
                     "held out": ([r["step"] for r in held], [r[held_key] for r in held]),
                     f"best checkpoint (step {best_step})": ([r["step"] for r in best], [r[held_key] for r in best])},
                    title, "optimizer step", ylabel, hlines)
    return png_markdown(png, title)


def _selection_rows(m, by_reward: bool = False) -> list[tuple]:
    """Summary-table rows of the schedule and the checkpoint kept (SftMetrics or AlignMetrics),
    selected by held-out loss, or by held-out reward (grpo)."""
    overfit = (f"yes, after step {m.overfitting_from_step}" if m.overfitting_from_step >= 0 else "no")
    figure, best, worse, better = (("reward", "highest", "fell", "rose") if by_reward else ("loss", "lowest", "rose", "fell"))
    return [("steps run / planned", f"{m.steps_run} / {m.planned_steps}" + (" (stopped early)" if m.stopped_early else "")),
            ("epochs run", f"{m.epochs:.2f}"),
            (f"checkpoint kept: step ({best} held-out {figure})", m.best_step),
            (f"held-out {figure}: kept / last evaluation", f"{m.best_eval_loss:.4f} / {m.last_eval_loss:.4f}"),
            (f"held-out {figure} {worse} while training {figure} {better}", overfit),
            ("training time (s)", m.train_seconds)]


@dg.asset(
    group_name="training",
    kinds={"pytorch", "peft", "dvc"},
    deps=["sft_dataset", "base_checkpoint"],
    check_specs=[dg.AssetCheckSpec(
        "lora_improves_reply_loss", asset="lora_checkpoint",
        description="Held-out response loss after fine-tuning is below the base model's.")],
)
def lora_checkpoint(context: dg.AssetExecutionContext, config: LoraCheckpointConfig, lake: LakeResource,
                    pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """The base checkpoint instruction-tuned with a PEFT adapter (LoRA; QLoRA or IA3 by config), loss
    on the response tokens only. `adapter/` holds the adapter, `merged/` the adapter folded into
    fp32 weights: a plain model that `AutoModelForCausalLM.from_pretrained` loads."""
    settings = settings_of(config, SftSettings)
    settings.validate()  # a bad config fails here, naming the field, before anything loads
    data = lake.artifact_dir("sft_dataset")
    train, held_out = (posttrain_data.read_chats(data, s) for s in ("train", "validation"))
    sources = tuple(posttrain_data.read_sources(data, s) for s in ("train", "validation"))  # names chats cut to max_len
    out = lake.artifact_dir("lora_checkpoint")
    with lake.write("lora_checkpoint") as staging:
        result = post_train(context, pipes_subprocess_client, config.nproc_per_node, "sft", settings,
                            base_dir=lake.artifact_dir("base_checkpoint"), train_chats=train, eval_chats=held_out,
                            work_dir=lake.work_dir("lora_checkpoint"), out_dir=staging, sources=sources)
        tuned = _tune(merged_dir(staging), held_out, config)
    version = lake.record("lora_checkpoint")
    m = result.metrics
    improved = m.eval_reply_loss_after < m.eval_reply_loss_before
    rows = [("method", m.method), ("trainable parameters", m.trainable_parameters),
            ("share of all parameters", f"{m.trainable_share:.2%}"),
            ("held-out response loss, base", m.eval_reply_loss_before),
            ("held-out response loss, fine-tuned (kept checkpoint)", m.eval_reply_loss_after),
            ("training examples", m.train_examples), *_selection_rows(m)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **asdict(m),  # every figure a number or text: the UI charts the numbers across runs
            **tuned,
            "processes": config.nproc_per_node,
            "adapter_path": dg.MetadataValue.path(str(adapter_dir(out))),
            "merged_path": dg.MetadataValue.path(str(merged_dir(out))),
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], rows)),
            "loss_curve": dg.MetadataValue.md(_curve(
                result.history, m.best_step, "instruction tuning loss (response tokens)", "loss (nats/token)",
                {"base, held out": m.eval_reply_loss_before})),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="lora_improves_reply_loss", passed=improved, severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": m.eval_reply_loss_before, "observed": m.eval_reply_loss_after})],
    )


def _online_data(settings: AlignSettings, config, lake: LakeResource) -> OnlineData:
    """grpo's prompts: sft_dataset's training chats, and held-out ones from the TUNING half of its
    validation chats (eval_report tests on the other half); the reward model where it is weighted."""
    from transformers import AutoTokenizer

    chats = lake.artifact_dir("sft_dataset")
    sft_dir = merged_dir(lake.artifact_dir("lora_checkpoint"))
    held_out = generation.held_out_prompts(AutoTokenizer.from_pretrained(sft_dir),
                                           posttrain_data.read_chats(chats, "validation"), config.tuning_prompts,
                                           generation.TUNING, settings.max_completion_length, context_length(sft_dir))
    return OnlineData(posttrain_data.read_chats(chats, "train"), held_out,
                      lake.artifact_dir("reward_model") if settings.reward_model_weight else None)


@dg.asset(
    group_name="training",
    kinds={"pytorch", "trl", "dvc"},
    deps=["preference_dataset", "lora_checkpoint", "base_checkpoint", "sft_dataset", "reward_model"],
    check_specs=[dg.AssetCheckSpec(
        "aligned_preference_accuracy", asset="aligned_checkpoint",
        description="The objective's own held-out accuracy (method_accuracy: DPO's implicit-reward accuracy, or "
                    "the reference-free accuracy for ORPO/SimPO) reaches min_accuracy.")],
)
def aligned_checkpoint(context: dg.AssetExecutionContext, config: AlignedCheckpointConfig, lake: LakeResource,
                       pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """The LoRA model aligned with TRL: on preference pairs (DPO plus an SFT term by default; IPO,
    SimPO, ORPO or KTO by `objective`), or online (grpo: replies sampled to sft_dataset's prompts,
    rewarded by ROUGE-L and reward_model), the LoRA model itself as the frozen reference where the
    objective has one; saved as adapter and merged fp32 model, from the checkpoint of the lowest
    held-out loss (grpo: highest held-out reward). Metadata compares the held-out preference
    accuracy of the base, LoRA and aligned models."""
    settings = settings_of(config, AlignSettings)
    settings.validate()
    data = lake.artifact_dir("preference_dataset")
    train, held_out = (posttrain_data.read_preferences(data, s) for s in ("train", "validation"))
    out = lake.artifact_dir("aligned_checkpoint")
    online = _online_data(settings, config, lake) if settings.online else None
    with lake.write("aligned_checkpoint") as staging:
        result = post_train(context, pipes_subprocess_client, config.nproc_per_node, "align", settings,
                            sft_dir=merged_dir(lake.artifact_dir("lora_checkpoint")), train_pairs=train,
                            eval_pairs=held_out, work_dir=lake.work_dir("aligned_checkpoint"), out_dir=staging,
                            compare={"base": lake.artifact_dir("base_checkpoint")}, online=online)
        tuned = _tune(merged_dir(staging), posttrain_data.read_chats(lake.artifact_dir("sft_dataset"), "validation"),
                      config)
    version = lake.record("aligned_checkpoint")
    m = result.metrics
    gain = m.accuracy_gain_over_lora
    rows = [(name, f"{s.accuracy:.1%}", s.logp_chosen, s.logp_rejected, s.logp_margin)
            for name, s in result.scores.items()]
    summary = [("objective (beta, SFT weight)", f"{m.objective} ({m.beta:g}, {m.sft_weight:g})"),
               ("method accuracy, held out", f"{m.method_accuracy:.1%} ({m.method_accuracy_source})"),
               # grpo trains on prompts; its pairs only measure it
               (("training prompts, held-out prompts", f"{len(online.train_chats)}, {len(online.eval_chats)}")
                if online else ("training pairs", m.train_pairs)),
               *_selection_rows(m, by_reward=settings.online)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **m.as_dict(),  # every figure a number or text
            **tuned,
            "processes": config.nproc_per_node,
            "adapter_path": dg.MetadataValue.path(str(adapter_dir(out))),
            "merged_path": dg.MetadataValue.path(str(merged_dir(out))),
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], summary)),
            "preference_accuracy": dg.MetadataValue.md(
                f"Held-out pairs: {m.eval_pairs}. Accuracy = share of pairs whose chosen reply the model finds "
                "more likely (per token) than the rejected one.\n\n" + markdown_table(
                    ["model", "accuracy", "mean log p(chosen)", "mean log p(rejected)", "mean margin"], rows)),
            "loss_curve": dg.MetadataValue.md(
                _curve(result.history, m.best_step, "grpo: mean reward of the sampled replies", "reward",
                       keys=("reward", "eval_reward")) if settings.online
                else _curve(result.history, m.best_step, f"{m.objective} loss", "loss")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="aligned_preference_accuracy",
            passed=m.method_accuracy >= config.min_accuracy,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold_accuracy": config.min_accuracy, "observed_accuracy": m.method_accuracy,
                      "accuracy_source": m.method_accuracy_source,
                      # reference-free, per token: on on-policy pairs it can move against reply quality
                      "reference_free_gain_over_lora": gain,
                      "aligned_preference_accuracy": m.preference_accuracy["aligned"],
                      "lora_accuracy": m.preference_accuracy["lora"]})],
    )
