"""Group `evaluation`: eval_report, every checkpoint measured on the same held-out data, with the
release gates that need the whole comparison."""

import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.posttrain import posttrain_data, reward
from llm_assets.lib.pretrain.model_dir import context_length, merged_dir
from llm_assets.lib.release import quantize
from llm_assets.lib.release import candidates as candidates_lib
from llm_assets.lib.release import release as release_lib
from llm_assets.lib.tokenizer import packing
from llm_assets.lib.common.report import figure_markdown, markdown_table, pyplot
from llm_assets.lib.common.settings import settings_of

ALIGNMENT_GATE = "aligned_beats_lora"
GENERATION_GATE = "generation_non_empty"
LOOP_GATE = "replies_do_not_loop"
COLUMNS = [("val_perplexity", "val ppl"), ("instruction_loss", "instr. loss"), ("preference_accuracy", "pref. acc"),
           ("rouge_l", "ROUGE-L"), ("rouge_l_plain_greedy", "ROUGE-L, plain greedy"), ("reward_mean", "reward"),
           ("max_token_run", "longest token run"), ("latency_ms_per_token_p50", "ms/token p50"), ("latency_ms_per_token_p95", "ms/token p95"),
           ("tokens_per_second", "tokens/s"), ("peak_memory_bytes", "peak memory (B)"), ("parameters", "parameters"),
           ("disk_bytes", "disk (B)")]


class EvalReportConfig(dg.Config, evaluation.EvalSettings):
    """The evaluation settings of lib/evaluate/evaluation.py plus eval_report's release gates."""

    min_win_rate: float = Field(0.5, ge=0, le=1, description="Gate: share of held-out prompts on which the reward model prefers the aligned model's reply to the LoRA model's (ties count half); the aligned model's ROUGE-L must also not be below the LoRA model's.")
    min_rouge_ratio: float = Field(1.0, ge=0, description="Gate: the aligned model's ROUGE-L must be at least this multiple of the LoRA model's.")
    max_empty_generations: int = Field(0, ge=0, description="Gate: prompts for which the quantized model may generate empty text.")
    max_token_run: int = Field(3, ge=1, description="Gate: the longest run of one repeated token allowed in a generation of the aligned or quantized model.")
    candidates: list[str] = Field([], description="Release candidates evaluated and gated beside the quantized model (which always is), for release's release_rule: distilled | pruned (each must be materialized). Empty: the quantized model alone, as before.")
    model_version: str = Field("", description="Also evaluate this released version as the row `release`, beside the candidates: a version under data/releases/, `current` (what the release pointer serves) or `canary` (the pointer's canary); empty: none. The gates never look at it.")


def _plot(rows: dict[str, evaluation.ModelFigures]) -> str:
    plt = pyplot()
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), layout="tight")
    for ax, (key, title) in zip(axes, [("val_perplexity", "validation perplexity"),
                                       ("preference_accuracy", "held-out preference accuracy"),
                                       ("latency_ms_per_token_p50", "latency, ms per token (p50)")]):
        ax.bar(names, [getattr(rows[n], key) for n in names], color=["#9aa5b1", "#4f6bed", "#2f9e44", "#e8590c", "#ae3ec9"][: len(names)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    return figure_markdown(fig, "model comparison")


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "dvc"},
    deps=["base_checkpoint", "lora_checkpoint", "aligned_checkpoint", "quantized_model", "reward_model",
          "sft_dataset", "preference_dataset", "tokenized_shards", "distilled_model", "pruned_model"],
    check_specs=[
        dg.AssetCheckSpec(ALIGNMENT_GATE, asset="eval_report", blocking=True,
                          description="Judged by the reward model, the aligned model's greedy replies win on at least min_win_rate of held-out prompts against the LoRA model's, and their ROUGE-L is not below the LoRA model's."),
        dg.AssetCheckSpec(LOOP_GATE, asset="eval_report", blocking=True,
                          description="No generation of the aligned or quantized model repeats one token more than max_token_run times in a row."),
        dg.AssetCheckSpec(GENERATION_GATE, asset="eval_report", blocking=True,
                          description="The quantized model (the release candidate) generates non-empty text for every prompt."),
    ],
)
def eval_report(context: dg.AssetExecutionContext, config: EvalReportConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Base, LoRA, aligned and quantized models on the same held-out data: validation perplexity,
    instruction loss, preference accuracy, ROUGE-L of generations (with each model's shipped
    generation config and plain greedy), the reward model's score of them and the aligned model's
    win rate over the LoRA model, repetition, latency per token (p50/p95), tokens/s, peak memory,
    parameters and size on disk; the issue's quality bars beside them. `report.json` (figures,
    samples, gates, bars) and `report.md` (the same, readable). With `model_version`, a released
    version (the current release, the canary, or a named one) is measured too, as the row `release`."""
    from transformers import AutoTokenizer

    settings = settings_of(config, evaluation.EvalSettings)
    settings.validate()
    released = _released_version(lake, config.model_version)  # before the expensive part: a wrong name fails at once
    aligned = merged_dir(lake.artifact_dir("aligned_checkpoint"))
    seq_len = context_length(aligned)  # windows and examples as long as the models' context
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    data = evaluation.EvalData.build(
        packing.load_tokens(lake.artifact_dir("tokenized_shards"), "validation"),
        posttrain_data.read_chats(lake.artifact_dir("sft_dataset"), "validation"),
        posttrain_data.read_preferences(lake.artifact_dir("preference_dataset"), "validation"), tokenizer, settings, seq_len)
    models = {"base": lake.artifact_dir("base_checkpoint"), "lora": merged_dir(lake.artifact_dir("lora_checkpoint")),
              "aligned": aligned, "quantized": lake.artifact_dir("quantized_model"), **_candidate_dirs(lake, config.candidates)}
    if released is not None:
        models["release"] = Path(released["path"])
    judge = reward.load_reward_model(lake.artifact_dir("reward_model"))
    rows, texts = {}, {}
    for name, path in models.items():
        rows[name], texts[name] = evaluation.evaluate_model(
            lambda p=path: quantize.load_for_inference(p), path, tokenizer, data, settings,
            parameters=rows["aligned"].parameters if name in ("quantized", "release") else None, judge=judge)
        context.log.info(f"{name}: {json.dumps(asdict(rows[name]))}")
    win = reward.win_rate(*judge, data.prompt_chats, texts["aligned"], texts["lora"])
    gates = _gates(rows, win, config)
    candidates = {name: {"gates": _gates(rows, win, config, name)} for name in ["quantized", *config.candidates]}
    candidates_md = _candidates_table(lake, rows, candidates)
    bars = _quality_bars(lake, rows, win, config)
    samples = [{"prompt": tokenizer.decode(data.prompts[i], skip_special_tokens=True), "reference": data.references[i],
                **{name: texts[name][i] for name in models}} for i in range(min(settings.samples, len(data.prompts)))]
    table = markdown_table(["model", *[label for _, label in COLUMNS]],
                           [(name, *[getattr(row, key) for key, _ in COLUMNS]) for name, row in rows.items()])
    bars_md = markdown_table(["quality bar", "observed", "bar", "met"], [(b["bar"], b["observed"], b["rule"], b["met"]) for b in bars])
    sample_md = "\n\n".join(
        f"**{s['prompt'].strip()[:200]}**\n\n" + markdown_table(["model", "text"], [("reference", s["reference"][:300]),
                                                                                   *[(n, s[n][:300]) for n in models]])
        for s in samples)
    out = lake.artifact_dir("eval_report")
    with lake.write("eval_report") as tmp:
        report = {"models": {n: str(p) for n, p in models.items()}, "settings": {"seq_len": seq_len, **settings.model_dump()},
                  "release_version": released and released["version"],
                  "figures": {name: asdict(row) for name, row in rows.items()}, "aligned_win_rate_over_lora": win,
                  "gates": gates, "candidates": candidates, "quality_bars": bars, "samples": samples}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(
            f"# Evaluation report\n\n{table}\n\nAligned over LoRA, judged by the reward model: {win:.1%}\n\n"
            "## Gates\n\n" + markdown_table(["gate", "passed", "threshold", "observed", "rule"], [tuple(g.values()) for g in gates])
            + f"\n\n## Release candidates\n\n{candidates_md}\n\n## Quality bars\n\n{bars_md}\n\n## Samples\n\n{sample_md}\n")
    version = lake.record("eval_report")
    flat = {f"{name}_{key}": value for name, row in rows.items() for key, value in asdict(row).items()}
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **flat,  # numbers: the UI charts each across materializations
            "aligned_win_rate_over_lora": win,
            **({"release_version": released["version"]} if released else {}),
            "quality_bars_met": sum(b["met"] for b in bars),
            "comparison": dg.MetadataValue.md(table),
            "candidates": dg.MetadataValue.md(candidates_md),
            "quality_bars": dg.MetadataValue.md(bars_md),
            "plot": dg.MetadataValue.md(_plot(rows)),
            "samples": dg.MetadataValue.md(sample_md),
            "report": dg.MetadataValue.path(str(out / "report.md")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(check_name=g["name"], passed=g["passed"], metadata={
            "threshold": g["threshold"], "observed": g["observed"], "rule": g["rule"]}) for g in gates],
    )


def _released_version(lake: LakeResource, wanted: str) -> dict | None:
    """{version, path} of the released version eval_report should add (model_version), or None."""
    if not wanted:
        return None
    pointer = release_lib.current_release(lake.paths.releases)
    if wanted in ("current", "canary"):
        found = pointer if wanted == "current" else (pointer or {}).get("canary")
        if found is None:
            raise dg.Failure(description=f"model_version {wanted!r}: the release pointer names no {wanted} release "
                                         f"({release_lib.pointer_path(lake.paths.releases)})")
        return {"version": found["version"], "path": found["path"]}
    if wanted not in release_lib.released_versions(lake.paths.releases):
        raise dg.Failure(description=f"model_version {wanted!r} was never released (released: "
                                     f"{', '.join(release_lib.released_versions(lake.paths.releases)) or 'none'})")
    return {"version": wanted, "path": str(lake.paths.releases / wanted)}


def _candidate_dirs(lake: LakeResource, names: list[str]) -> dict:
    """{name: model directory} of the extra release candidates (lib/release/candidates.py)."""
    unknown = [n for n in names if n not in candidates_lib.CANDIDATES or n == "quantized"]
    if unknown:
        raise dg.Failure(description=f"candidates: unknown {unknown}; choose among "
                                     f"{sorted(set(candidates_lib.CANDIDATES) - {'quantized'})}")
    return {n: lake.artifact_dir(candidates_lib.CANDIDATES[n][0]) for n in names}


def _candidates_table(lake: LakeResource, rows: dict[str, evaluation.ModelFigures], found: dict) -> str:
    """The release candidates side by side: size, speed, quality and every gate (its own and these)."""
    def gates(name: str) -> str:
        asset, gate_file = candidates_lib.CANDIDATES[name]
        own = json.loads((lake.artifact_dir(asset) / gate_file).read_text())["gate"]
        failed = [g["name"] for g in [own, *found[name]["gates"]] if not g["passed"]]
        return "pass" if not failed else "FAIL: " + ", ".join(failed)
    return markdown_table(["candidate", "disk (B)", "tokens/s", "val ppl", "ROUGE-L", "gates"],
                          [(n, rows[n].disk_bytes, rows[n].tokens_per_second, rows[n].val_perplexity, rows[n].rouge_l,
                            gates(n)) for n in found])


def _gates(rows: dict[str, evaluation.ModelFigures], win: float, config: EvalReportConfig,
           candidate: str = "quantized") -> list[dict]:
    """The release gates of a candidate (the quantized model: eval_report's blocking checks): what
    alignment is for (preferred replies, no loss of overlap with the references), non-empty and
    non-looping generations of the candidate."""
    aligned, lora = rows["aligned"], rows["lora"]
    loop = max(rows["aligned"].max_token_run, rows[candidate].max_token_run)
    return [
        {"name": ALIGNMENT_GATE,
         "passed": win >= config.min_win_rate and aligned.rouge_l >= config.min_rouge_ratio * lora.rouge_l,
         "threshold": f"win rate {config.min_win_rate:.2f}; ROUGE-L {config.min_rouge_ratio * lora.rouge_l:.4f}",
         "observed": f"win rate {win:.3f}; ROUGE-L {aligned.rouge_l:.4f}",
         "rule": "reward-model win rate of aligned over LoRA >= min_win_rate and aligned ROUGE-L >= min_rouge_ratio x LoRA's"},
        {"name": GENERATION_GATE, "passed": rows[candidate].empty_generations <= config.max_empty_generations,
         "threshold": config.max_empty_generations, "observed": rows[candidate].empty_generations,
         "rule": f"empty generations of the {candidate} model <= max_empty_generations"},
        {"name": LOOP_GATE, "passed": loop <= config.max_token_run, "threshold": config.max_token_run, "observed": loop,
         "rule": f"longest run of one token in an aligned or {candidate} generation <= max_token_run"},
    ]


def _quality_bars(lake: LakeResource, rows: dict[str, evaluation.ModelFigures], win: float,
                  config: EvalReportConfig) -> list[dict]:
    """The demo's quality bars (issue "The model earns its release"), each observed on held-out data."""
    base = json.loads((lake.artifact_dir("base_checkpoint") / "final_metrics.json").read_text())
    aligned_run = json.loads((merged_dir(lake.artifact_dir("aligned_checkpoint")).parent / "metrics.json").read_text())
    ratio = rows["aligned"].rouge_l / max(rows["lora"].rouge_l, 1e-9)
    loop = max(rows["aligned"].max_token_run, rows["quantized"].max_token_run)
    bars = [("base perplexity / unigram", base["perplexity_vs_unigram"], "<= 0.15", base["perplexity_vs_unigram"] <= 0.15),
            ("LoRA held-out reply loss vs base", rows["lora"].instruction_loss, f"< {rows['base'].instruction_loss:.4f}",
             rows["lora"].instruction_loss < rows["base"].instruction_loss),
            (f"aligned held-out accuracy ({aligned_run['method_accuracy_source']})", aligned_run["method_accuracy"], ">= 0.70",
             aligned_run["method_accuracy"] >= 0.70),
            ("aligned ROUGE-L / LoRA ROUGE-L", ratio, ">= 1.1", ratio >= 1.1),
            ("reward-model win rate, aligned over LoRA", win, ">= 0.55", win >= 0.55),
            ("longest token run (aligned, quantized)", loop, "<= 3", loop <= 3)]
    return [{"bar": b, "observed": o, "rule": r, "met": bool(m)} for b, o, r, m in bars]
