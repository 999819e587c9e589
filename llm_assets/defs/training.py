"""Group `training`: base_checkpoint, pretrained from scratch in a subprocess through Dagster Pipes.

Training runs as `python -m llm_assets.workers.pretrain` (or under `torchrun --nproc_per_node N` for
DDP) so a crash of the trainer never takes the Dagster step down with it, logs and final metrics
stream back over Pipes, and a re-run resumes from the last checkpoint in `data/lake/.work/`.
`TorchrunConfig` and `post_train` are how the post-training assets run under torchrun too.
"""

import json
import sys
from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.pretrain.pretrain import PretrainSettings, load_training_tokens
from llm_assets.lib.pretrain.run_metrics import PretrainMetrics
from llm_assets.lib.common.report import markdown_table, png_markdown
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.posttrain import hf_training
from llm_assets.workers import posttrain as posttrain_worker


class TorchrunConfig(dg.Config):
    """How a training asset launches its trainer: the process count, the same field in every
    training asset's config (base_checkpoint, lora_checkpoint, reward_model, aligned_checkpoint)."""

    nproc_per_node: int = Field(1, ge=1, description="Processes for torch DDP via torchrun (gloo on CPU, nccl on GPU); "
                                                     "1 = no torchrun: one plain process (post-training: the step's "
                                                     "own). Post-training splits each step's batch_size examples "
                                                     "evenly over them.")


def torchrun(args: list[str], nproc_per_node: int) -> list[str]:
    """The command running `python <args>` in nproc_per_node DDP processes on this machine, or as
    one plain process when it is 1."""
    if nproc_per_node > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}", *args]
    return [sys.executable, *args]


def post_train(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient, nproc_per_node: int, stage: str,
               settings, **arguments):
    """Run a lib/posttrain stage (workers/posttrain.py STAGES) on `arguments`: with one process in this
    one, as before; with more under torchrun through Pipes (progress streams back as log lines) and
    its result read back from the files it wrote. The same function, arguments and artifact."""
    if nproc_per_node == 1:
        return posttrain_worker.STAGES[stage].train(settings, **arguments,
                                                    log=lambda event: context.log.info(json.dumps(event)))
    hf_training.per_device_batch(settings.batch_size, nproc_per_node)  # fails here, naming batch_size, if uneven
    request = Path(arguments["work_dir"]) / "request.json"
    posttrain_worker.write_request(request, stage, settings, **arguments)
    pipes.run(command=torchrun(["-m", "llm_assets.workers.posttrain", str(request)], nproc_per_node), context=context)
    return posttrain_worker.STAGES[stage].read_result(arguments["out_dir"])


class PretrainConfig(TorchrunConfig, PretrainSettings):
    """The trainer's settings (lib/pretrain/pretrain.py: fields, defaults, descriptions) plus how the
    asset launches it."""


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
        reported = pipes_subprocess_client.run(
            command=torchrun(args, config.nproc_per_node), context=context, cwd=str(lake.root)).get_materialize_result()
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
