"""Group `release`, the smaller candidates: distilled_model (a student of the aligned model) and
pruned_model (the aligned model with heads and FFN channels cut, then recovered). Each reports
itself against the aligned model and carries a non-blocking perplexity gate: a candidate that fails
it is only not eligible for release (ReleaseConfig.rule); the demo's release does not depend on it.
In their own module beside release.py, which holds the quantized and exported models."""

import json
from functools import partial

import dagster as dg
import numpy as np
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.common.report import markdown_table
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.pretrain.model_dir import context_length, load_model, merged_dir
from llm_assets.lib.release import compare, distill, prune
from llm_assets.lib.tokenizer import packing

TEXT = ["aligned_checkpoint", "tokenized_shards", "sft_dataset"]


class CandidateConfig(dg.Config):
    """What a smaller candidate is measured on against the aligned model, and its gate."""

    perplexity_budget: float = Field(0.5, ge=-1, description="Gate (not blocking): the candidate's validation "
                                     "perplexity may exceed the aligned model's by at most this share.")
    compare_windows: int = Field(32, ge=1, description="Validation windows both models are scored on for perplexity.")
    compare_prompts: int = Field(32, ge=1, description="Held-out prompts both models generate from (ROUGE-L, tokens/s).")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per prompt at most (greedy, each model's "
                                "generation_config.json).")


class DistillConfig(CandidateConfig, distill.DistillSettings):
    """lib/release/distill.py's settings (the student's shape, temperature, schedule) and the gate."""


class PruneConfig(CandidateConfig, prune.PruneSettings):
    """lib/release/prune.py's settings (what to cut, the recovery schedule) and the gate."""


def _text(lake: LakeResource) -> tuple[tuple[np.ndarray, np.ndarray], tuple[list, list]]:
    """((training, validation) token streams, (training, validation) SFT chats)."""
    tokens, chats = lake.artifact_dir("tokenized_shards"), lake.artifact_dir("sft_dataset")
    return ((packing.load_tokens(tokens, "train"), packing.load_tokens(tokens, "validation")),
            (posttrain_data.read_chats(chats, "train"), posttrain_data.read_chats(chats, "validation")))


def _measure(teacher_dir, candidate_dir, corpus, chats, config: CandidateConfig) -> tuple[dict, list[tuple]]:
    """(figures file content: both models' figures, the ratios and the gate; the comparison rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    held_out = compare.HeldOut.build(tokenizer, corpus[1], chats[1], config.compare_windows, config.compare_prompts,
                                     config.max_new_tokens, context_length(teacher_dir))
    aligned = compare.measure(load_model(teacher_dir), teacher_dir, tokenizer, held_out)
    mine = compare.measure(load_model(candidate_dir), candidate_dir, tokenizer, held_out)
    ratios = compare.versus(mine, aligned)
    return {"figures": mine.__dict__, "aligned_figures": aligned.__dict__, **ratios,
            "gate": {"passed": ratios["perplexity_ratio"] <= 1 + config.perplexity_budget,
                     "threshold": 1 + config.perplexity_budget, "observed": ratios["perplexity_ratio"],
                     "rule": "perplexity / aligned perplexity <= 1 + budget"}}, compare.rows(mine, aligned)


def _result(lake: LakeResource, asset: str, gate: str, found: dict, rows: list[tuple], run: dict,
            label: str) -> dg.MaterializeResult:
    version = lake.record(asset)
    g = found["gate"]
    return dg.MaterializeResult(
        metadata={**artifact_metadata(lake.artifact_dir(asset), version),
                  **{k: v for k, v in {**found, **run}.items() if isinstance(v, (int, float, str))},
                  "comparison": dg.MetadataValue.md(markdown_table(["figure", label, "aligned", "ratio (ROUGE-L: gap)"],
                                                                   rows))},
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(check_name=gate, passed=g["passed"], metadata={
            "threshold": g["threshold"], "observed": g["observed"], "rule": g["rule"]})])


def _compressed(context, lake: LakeResource, config, asset: str, gate: str, report: str, label: str,
                train) -> dg.MaterializeResult:
    """`train(source, corpus, chats, work_dir, out_dir, log=)` a smaller model from the aligned one
    into `asset`, measure it beside the aligned model, and write `report` (json) with its gate."""
    source = merged_dir(lake.artifact_dir("aligned_checkpoint"))
    corpus, chats = _text(lake)
    with lake.write(asset) as tmp:
        result = train(source, corpus, chats, lake.work_dir(asset), tmp, log=lambda e: context.log.info(json.dumps(e)))
        found, rows = _measure(source, tmp, corpus, chats, config)
        found["gate"]["name"] = gate
        (tmp / report).write_text(json.dumps(found, indent=2))
    return _result(lake, asset, gate, found, rows, result.metrics.__dict__, label)


DISTILL_GATE = "distilled_perplexity_within_budget"
PRUNE_GATE = "pruned_perplexity_within_budget"


@dg.asset(group_name="release", kinds={"pytorch", "dvc"}, deps=TEXT, check_specs=[dg.AssetCheckSpec(
    DISTILL_GATE, asset="distilled_model", blocking=False,
    description="The student's validation perplexity is within perplexity_budget of the aligned model's.")])
def distilled_model(context: dg.AssetExecutionContext, config: DistillConfig, lake: LakeResource) -> dg.MaterializeResult:
    """A smaller student (student_layers blocks, student_width wide) trained to match the aligned
    model's next-token distributions (KL at a temperature) on corpus windows and SFT chats; its size,
    speed, perplexity and ROUGE-L beside the aligned model's (`distillation.json`, metrics.json)."""
    return _compressed(context, lake, config, "distilled_model", DISTILL_GATE, "distillation.json", "distilled",
                       partial(distill.distill, settings_of(config, distill.DistillSettings)))


@dg.asset(group_name="release", kinds={"pytorch", "dvc"}, deps=TEXT, check_specs=[dg.AssetCheckSpec(
    PRUNE_GATE, asset="pruned_model", blocking=False,
    description="The pruned model's validation perplexity is within perplexity_budget of the aligned model's.")])
def pruned_model(context: dg.AssetExecutionContext, config: PruneConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The aligned model with head_share of its attention heads and ffn_share of its FFN channels
    removed from every block (the least important by activation x gradient), then recovered by a
    short distillation from the unpruned model; speed and quality beside it (`pruning.json`)."""
    return _compressed(context, lake, config, "pruned_model", PRUNE_GATE, "pruning.json", "pruned",
                       partial(prune.prune, settings_of(config, prune.PruneSettings)))
