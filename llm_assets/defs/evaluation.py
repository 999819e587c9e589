"""Group `evaluation`: eval_report, every checkpoint measured on the same held-out data, with the
release gates that need the whole comparison."""

import json
from dataclasses import asdict

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.pretrain.model_dir import context_length, merged_dir
from llm_assets.lib.release import quantize
from llm_assets.lib.tokenizer import packing
from llm_assets.lib.common.report import figure_markdown, markdown_table
from llm_assets.lib.common.settings import settings_of

PREFERENCE_GATE = "aligned_preference_not_below_lora"
GENERATION_GATE = "generation_non_empty"
COLUMNS = [("val_perplexity", "val ppl"), ("instruction_loss", "instr. loss"), ("preference_accuracy", "pref. acc"),
           ("rouge_l", "ROUGE-L"), ("latency_ms_per_token_p50", "ms/token p50"), ("latency_ms_per_token_p95", "ms/token p95"),
           ("tokens_per_second", "tokens/s"), ("peak_memory_bytes", "peak memory (B)"), ("parameters", "parameters"),
           ("disk_bytes", "disk (B)")]


class EvalReportConfig(dg.Config, evaluation.EvalSettings):
    """The evaluation settings of lib/evaluate/evaluation.py plus eval_report's release gates."""

    preference_tolerance: float = Field(0.0, ge=0, description="Gate: the aligned model's preference accuracy may trail the LoRA model's by at most this much.")
    max_empty_generations: int = Field(0, ge=0, description="Gate: prompts for which the quantized model may generate empty text.")


def _plot(rows: dict[str, evaluation.ModelFigures]) -> str:
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), layout="tight")
    for ax, (key, title) in zip(axes, [("val_perplexity", "validation perplexity"),
                                       ("preference_accuracy", "held-out preference accuracy"),
                                       ("latency_ms_per_token_p50", "latency, ms per token (p50)")]):
        ax.bar(names, [getattr(rows[n], key) for n in names], color=["#9aa5b1", "#4f6bed", "#2f9e44", "#e8590c"][: len(names)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    return figure_markdown(fig, "model comparison")


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "dvc"},
    deps=["base_checkpoint", "lora_checkpoint", "aligned_checkpoint", "quantized_model",
          "sft_dataset", "preference_dataset", "tokenized_shards"],
    check_specs=[
        dg.AssetCheckSpec(PREFERENCE_GATE, asset="eval_report", blocking=True,
                          description="The aligned model's held-out preference accuracy is not below the LoRA model's."),
        dg.AssetCheckSpec(GENERATION_GATE, asset="eval_report", blocking=True,
                          description="The quantized model (the release candidate) generates non-empty text for every prompt."),
    ],
)
def eval_report(context: dg.AssetExecutionContext, config: EvalReportConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Base, LoRA, aligned and quantized models on the same held-out data: validation perplexity,
    instruction loss, preference accuracy, ROUGE-L of generations, latency per token (p50/p95),
    tokens/s, peak memory, parameters and size on disk. `report.json` (figures, samples, gates) and
    `report.md` (the same, readable)."""
    from transformers import AutoTokenizer

    settings = settings_of(config, evaluation.EvalSettings)
    settings.validate()
    aligned = merged_dir(lake.artifact_dir("aligned_checkpoint"))
    seq_len = context_length(aligned)  # windows and examples as long as the models' context
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    data = evaluation.EvalData.build(
        packing.load_tokens(lake.artifact_dir("tokenized_shards"), "validation"),
        posttrain_data.read_chats(lake.artifact_dir("sft_dataset"), "validation"),
        posttrain_data.read_preferences(lake.artifact_dir("preference_dataset"), "validation"), tokenizer, settings, seq_len)
    models = {"base": lake.artifact_dir("base_checkpoint"), "lora": merged_dir(lake.artifact_dir("lora_checkpoint")),
              "aligned": aligned, "quantized": lake.artifact_dir("quantized_model")}
    rows, texts = {}, {}
    for name, path in models.items():
        rows[name], texts[name] = evaluation.evaluate_model(
            lambda p=path: quantize.load_for_inference(p), path, tokenizer, data, settings, parameters=rows["aligned"].parameters if name == "quantized" else None)
        context.log.info(f"{name}: {json.dumps(asdict(rows[name]))}")

    gates = [
        {"name": PREFERENCE_GATE, "passed": rows["aligned"].preference_accuracy >= rows["lora"].preference_accuracy - config.preference_tolerance,
         "threshold": rows["lora"].preference_accuracy - config.preference_tolerance,
         "observed": rows["aligned"].preference_accuracy, "rule": "aligned accuracy >= LoRA accuracy - tolerance"},
        {"name": GENERATION_GATE, "passed": rows["quantized"].empty_generations <= config.max_empty_generations,
         "threshold": config.max_empty_generations, "observed": rows["quantized"].empty_generations,
         "rule": "empty generations of the quantized model <= max_empty_generations"},
    ]
    samples = [{"prompt": tokenizer.decode(data.prompts[i], skip_special_tokens=True), "reference": data.references[i],
                **{name: texts[name][i] for name in models}} for i in range(min(settings.samples, len(data.prompts)))]
    table = markdown_table(["model", *[label for _, label in COLUMNS]],
                           [(name, *[getattr(row, key) for key, _ in COLUMNS]) for name, row in rows.items()])
    sample_md = "\n\n".join(
        f"**{s['prompt'].strip()[:200]}**\n\n" + markdown_table(["model", "text"], [("reference", s["reference"][:300]),
                                                                                   *[(n, s[n][:300]) for n in models]])
        for s in samples)
    out = lake.artifact_dir("eval_report")
    with lake.write("eval_report") as tmp:
        report = {"models": {n: str(p) for n, p in models.items()}, "settings": {"seq_len": seq_len, **settings.model_dump()},
                  "figures": {name: asdict(row) for name, row in rows.items()},
                  "gates": gates, "samples": samples}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(f"# Evaluation report\n\n{table}\n\n## Gates\n\n" + markdown_table(
            ["gate", "passed", "threshold", "observed", "rule"], [tuple(g.values()) for g in gates])
            + f"\n\n## Samples\n\n{sample_md}\n")
    version = lake.record("eval_report")
    flat = {f"{name}_{key}": value for name, row in rows.items() for key, value in asdict(row).items()}
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **flat,  # numbers: the UI charts each across materializations
            "comparison": dg.MetadataValue.md(table),
            "plot": dg.MetadataValue.md(_plot(rows)),
            "samples": dg.MetadataValue.md(sample_md),
            "report": dg.MetadataValue.path(str(out / "report.md")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(check_name=g["name"], passed=g["passed"], metadata={
            "threshold": g["threshold"], "observed": g["observed"], "rule": g["rule"]}) for g in gates],
    )
