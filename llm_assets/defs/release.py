"""Group `release`: quantized_model (the aligned model quantized with bitsandbytes) and release (the
pointer the server loads, moved only when every gate passed)."""

import json

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.pretrain.model_dir import context_length, load_model, merged_dir, weights_bytes
from llm_assets.lib.release import quantize
from llm_assets.lib.common import versioning
from llm_assets.lib.release import candidates
from llm_assets.lib.release import release as release_lib
from llm_assets.lib.common.report import markdown_table
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.tokenizer import packing

PPL_GATE = "quantized_perplexity_within_budget"


class QuantizeConfig(dg.Config):
    method: str = Field("nf4", description="nf4 (4-bit NormalFloat, double-quantized scales) | int8 (LLM.int8()).")
    perplexity_budget: float = Field(0.05, ge=-1, description="Gate: the quantized model's validation perplexity may exceed the aligned model's by at most this share (negative demands an improvement: a way to rehearse a refused release).")
    perplexity_windows: int = Field(32, ge=1, description="Validation windows both models are scored on.")


@dg.asset(
    group_name="release",
    kinds={"bitsandbytes", "dvc"},
    deps=["aligned_checkpoint", "tokenized_shards"],
    check_specs=[dg.AssetCheckSpec(
        PPL_GATE, asset="quantized_model", blocking=True,
        description="Validation perplexity of the quantized model is within perplexity_budget of the aligned model's.")],
)
def quantized_model(context: dg.AssetExecutionContext, config: QuantizeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The aligned model quantized with bitsandbytes (nf4 or int8, both on CPU), saved with
    save_pretrained (one model.safetensors with the quantization state) so it reloads quantized and
    generates; `quantization.json` holds the figures and the perplexity gate."""
    source = merged_dir(lake.artifact_dir("aligned_checkpoint"))
    tokens = packing.load_tokens(lake.artifact_dir("tokenized_shards"), "validation")
    windows = evaluation.validation_windows(tokens, context_length(source), config.perplexity_windows)

    full = load_model(source)
    full_ppl, full_memory = evaluation.perplexity(full, windows), full.get_memory_footprint()
    del full
    out = lake.artifact_dir("quantized_model")
    with lake.write("quantized_model") as tmp:
        model = quantize.quantize(source, tmp, config.method)
        ppl, memory = evaluation.perplexity(model, windows), model.get_memory_footprint()
        passed = ppl <= full_ppl * (1 + config.perplexity_budget)
        figures = {
            "method": config.method, "source": str(source),
            "val_perplexity": ppl, "aligned_val_perplexity": full_ppl, "perplexity_ratio": ppl / full_ppl,
            "disk_bytes": weights_bytes(tmp), "aligned_disk_bytes": weights_bytes(source),
            "memory_bytes": memory, "aligned_memory_bytes": full_memory,
            "gate": {"name": PPL_GATE, "passed": passed, "threshold": 1 + config.perplexity_budget,
                     "observed": ppl / full_ppl, "rule": "perplexity / aligned perplexity <= 1 + budget"},
        }
        figures["disk_ratio"] = figures["disk_bytes"] / figures["aligned_disk_bytes"]
        figures["memory_ratio"] = memory / full_memory
        (tmp / "quantization.json").write_text(json.dumps(figures, indent=2))
    version = lake.record("quantized_model")
    rows = [("size on disk (bytes)", figures["disk_bytes"], figures["aligned_disk_bytes"], figures["disk_ratio"]),
            ("size in memory (bytes)", memory, full_memory, figures["memory_ratio"]),
            ("validation perplexity", ppl, full_ppl, figures["perplexity_ratio"])]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **{k: v for k, v in figures.items() if isinstance(v, (int, float, str))},
            "comparison": dg.MetadataValue.md(markdown_table(
                ["figure", f"quantized ({config.method})", "aligned (fp32)", "ratio"], rows)),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name=PPL_GATE, passed=passed,
            metadata={"threshold": 1 + config.perplexity_budget, "observed": ppl / full_ppl,
                      "quantized_perplexity": ppl, "aligned_perplexity": full_ppl})],
    )


class ReleaseConfig(dg.Config, release_lib.ReleaseSettings, candidates.RuleSettings):
    """lib/release/release.py's release settings (canary_share) and the rule picking the candidate
    (lib/release/candidates.py: release_rule)."""


def _candidates(lake: LakeResource, report: dict, rule: str) -> tuple[candidates.Candidate, list[candidates.Candidate]]:
    """(the candidate `rule` picks, every candidate considered). The default rule takes the quantized
    model with its gate and all of eval_report's gates, as before rules existed."""
    if rule == "quantized":
        q = json.loads((lake.artifact_dir("quantized_model") / "quantization.json").read_text())
        figures = report["figures"]["quantized"]
        chosen = candidates.Candidate("quantized", "quantized_model", figures["tokens_per_second"], figures["disk_bytes"],
                                      [release_lib.Gate(**q["gate"]), *(release_lib.Gate(**g) for g in report["gates"])])
        return chosen, [chosen]
    found = [candidates.candidate(name, json.loads((lake.artifact_dir(asset) / gate_file).read_text())["gate"], report)
             for name, (asset, gate_file) in candidates.CANDIDATES.items() if name in report.get("candidates", {})]
    return candidates.pick(rule, found), found


@dg.asset(group_name="release", kinds={"dvc"}, deps=["eval_report", "quantized_model", "distilled_model", "pruned_model"])
def release(context: dg.AssetExecutionContext, config: ReleaseConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Points `data/releases/current.json` (what `llm-assets serve` loads) at a copy of the candidate
    `release_rule` picks (by default the quantized model; fastest_passing / smallest_passing choose
    among eval_report's candidates, each through its own gates), only when every gate passed: the blocking checks stop a run before this step, and this
    step re-reads the gates from the artifacts, so a release started on its own cannot skip them.
    A refusal fails the step, keeps the previous release and is logged in `history.jsonl`. With
    `canary_share` > 0 the candidate becomes the canary beside the current release instead (the
    server routes that share of requests to it; `llm-assets rollback` withdraws it)."""
    settings_of(config, candidates.RuleSettings).validate()
    r = json.loads((lake.artifact_dir("eval_report") / "report.json").read_text())
    chosen, found = _candidates(lake, r, config.release_rule)
    model_dir, gates = lake.artifact_dir(chosen.asset), chosen.gates
    recorded = versioning.current_version(lake.root, chosen.asset)  # the hash of the files being copied
    if recorded is None:
        raise dg.Failure(description=f"{chosen.asset} has no recorded DVC version; materialize it first")
    version = recorded.md5
    releases = lake.paths.releases
    previous = release_lib.current_release(releases)
    info = {"model": chosen.asset, "release_rule": config.release_rule,
            "eval_report_md5": getattr(versioning.current_version(lake.root, "eval_report"), "md5", None)}
    if chosen.name == "quantized":
        info["method"] = json.loads((model_dir / "quantization.json").read_text())["method"]
    try:
        record = release_lib.publish(model_dir, releases, version, gates, info, canary_share=config.canary_share)
    except release_lib.GatesFailed as e:
        raise dg.Failure(description=str(e), metadata={
            "current_release": previous["version"] if previous else "none",
            "failed_gates": ", ".join(g.name for g in gates if not g.passed)}) from e
    rows = [(g.name, "pass" if g.passed else "FAIL", g.threshold, g.observed, g.rule) for g in gates]
    return dg.MaterializeResult(
        metadata={
            "version": record["version"],
            "previous_version": record["previous"] or "none",
            "path": dg.MetadataValue.path(record["path"]),
            "canary_version": record.get("canary", {}).get("version", "none"),
            "canary_share": record.get("canary", {}).get("share", 0.0),
            "pointer": dg.MetadataValue.path(str(release_lib.pointer_path(releases))),
            "gates": dg.MetadataValue.md(markdown_table(["gate", "result", "threshold", "observed", "rule"], rows)),
            "model": chosen.asset,
            "release_rule": config.release_rule,
            "candidates": dg.MetadataValue.md(markdown_table(
                ["candidate", "tokens/s", "disk (B)", "gates", "released"],
                [(c.name, c.tokens_per_second, c.disk_bytes, "pass" if c.passed else
                  "FAIL: " + ", ".join(g.name for g in c.gates if not g.passed), c is chosen) for c in found])),
        },
        data_version=dg.DataVersion(record["version"] + (f"+canary-{record['canary']['version']}" if "canary" in record else "")),
    )
