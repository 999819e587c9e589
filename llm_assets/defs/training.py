"""Group `training`: base_checkpoint, pretrained from scratch in a subprocess through Dagster Pipes.

Training runs as `python -m llm_assets.workers.pretrain` (or under `torchrun --nproc_per_node N` for
DDP) so a crash of the trainer never takes the Dagster step down with it, logs and final metrics
stream back over Pipes, and a re-run resumes from the last checkpoint in `data/lake/.work/`.
"""

import json
import sys

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.pretrain.pretrain import PretrainSettings, load_training_tokens
from llm_assets.lib.pretrain.run_metrics import PretrainMetrics
from llm_assets.lib.common.report import markdown_table, png_markdown
from llm_assets.lib.common.settings import settings_of


class PretrainConfig(dg.Config, PretrainSettings):
    """The trainer's settings (lib/pretrain/pretrain.py: fields, defaults, descriptions) plus how the
    asset launches it."""

    nproc_per_node: int = Field(1, ge=1, description="Processes for torch DDP via torchrun (gloo on CPU, nccl on GPU); 1 = plain process.")


@dg.asset(
    group_name="training",
    kinds={"pytorch", "dvc"},
    deps=["tokenized_shards", "tokenizer"],
    check_specs=[dg.AssetCheckSpec(
        "base_checkpoint_beats_unigram", asset="base_checkpoint",
        description="Validation perplexity is at most half the unigram baseline's (the demo quality bar).")],
)
def base_checkpoint(context: dg.AssetExecutionContext, config: PretrainConfig, lake: LakeResource,
                    pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """A small decoder-only transformer (transformers Llama, built from a size dial) pretrained from
    scratch on the packed shards; saved with save_pretrained (safetensors) together with its
    tokenizer and the exact training config. Resumes from the last checkpoint after a crash."""
    settings = settings_of(config, PretrainSettings)
    # A config or data that cannot work (seq_len over the context, empty or short shards) fails
    # here, in the step, with the field named, before any training process starts.
    settings.validate()
    load_training_tokens(lake.artifact_dir("tokenized_shards"), settings.seq_len)
    work = lake.work_dir("base_checkpoint")
    settings_file = work / "settings.json"
    settings_file.write_text(json.dumps(settings.model_dump(), indent=2))
    out = lake.artifact_dir("base_checkpoint")
    with lake.write("base_checkpoint") as staging:
        args = ["-m", "llm_assets.workers.pretrain", "--settings", str(settings_file),
                "--tokens", str(lake.artifact_dir("tokenized_shards")),
                "--tokenizer", str(lake.artifact_dir("tokenizer")), "--work", str(work), "--out", str(staging)]
        if config.nproc_per_node > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc_per_node}", *args]
        reported = pipes_subprocess_client.run(
            command=[sys.executable, *args], context=context, cwd=str(lake.root)).get_materialize_result()
        curve = (staging / "loss_curve.png").read_bytes()
    version = lake.record("base_checkpoint")
    m = PretrainMetrics(**{k: v.value for k, v in reported.metadata.items()})  # what the worker reported
    ratio = m.perplexity_vs_unigram  # validation perplexity / unigram baseline, same tokens
    rows = [("validation perplexity", m.val_perplexity), ("unigram perplexity (baseline)", m.unigram_perplexity),
            ("ratio (bar: <= 0.5)", ratio), ("parameters", m.parameters), ("tokens seen", m.tokens_seen),
            ("tokens per parameter", m.tokens_seen / m.parameters),
            ("tokens/s", m.tokens_per_second), ("MFU vs measured matmul peak (same dtype)", m.mfu)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            **reported.metadata,
            "processes": config.nproc_per_node,
            "tokens_per_parameter": m.tokens_seen / m.parameters,  # compute-optimal is ~20 (Chinchilla)
            "summary": dg.MetadataValue.md(markdown_table(["figure", "value"], rows)),
            "loss_curve": dg.MetadataValue.md(png_markdown(curve, "loss curve")),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="base_checkpoint_beats_unigram", passed=ratio <= 0.5, severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": 0.5, "observed_ratio": ratio})],
    )
