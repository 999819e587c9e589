"""Group `data`, the batches that arrive after the corpus was built: incoming_batch, one dynamic
partition per file dropped into data/incoming/ (incoming_data_sensor adds the partitions)."""

import functools
import hashlib

import dagster as dg
from pydantic import Field

from llm_assets.defs.data import CleanConfig
from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import clean, dedup, ingest
from llm_assets.lib.common.atomic import atomic_dir, sweep_leftovers
from llm_assets.lib.common.report import markdown_table
from llm_assets.lib.common.settings import settings_of

incoming_batches = dg.DynamicPartitionsDefinition(name="incoming_batches")


def ingested_batches(instance: dg.DagsterInstance) -> set[str]:
    """Keys of the batches ingested: those with a materialization. A partition alone says only that a
    run was asked for; a batch whose run failed is taken again (the sensor, `llm-assets ingest`)."""
    return set(instance.get_materialized_partitions(dg.AssetKey("incoming_batch")))


class IncomingBatchConfig(CleanConfig, ingest.IndexSettings):
    """The cleaning thresholds are clean_corpus's (set both alike); dedup takes the shards' own.
    lsh_storage shares one index among the workers that ingest batches."""

    jsonl_text_field: str = Field("text", description="Field holding the document text in .jsonl files.")
    parquet_text_column: str = Field("text", description="Column holding the document text in .parquet files.")


@dg.asset(
    group_name="data",
    kinds={"parquet", "dvc"},
    partitions_def=incoming_batches,
    deps=["deduped_shards"],
    check_specs=[dg.AssetCheckSpec("incoming_batch_adds_documents", asset="incoming_batch",
                                   description="Warns when cleaning and deduplication leave nothing new of the batch.")],
)
def incoming_batch(context: dg.AssetExecutionContext, config: IncomingBatchConfig, lake: LakeResource) -> dg.MaterializeResult:
    """One file from data/incoming/, cleaned with the corpus's rules and deduplicated (exact and
    MinHash) against the shards, every earlier batch and itself. Kept documents get the corpus's
    train/validation split; sft_dataset and preference_dataset read them beside the shards. Written
    to data/lake/incoming_batch/<key>/; the DVC figures are those of the whole directory."""
    key = context.partition_key
    lake.claim("incoming_batch")  # the batches read below for dedup must not change until this one is written
    path = ingest.find_batch_file(lake.paths.incoming, key)
    docs = ingest.read_batch_file(path, key, config.jsonl_text_field, config.parquet_text_column)
    shards = lake.artifact_dir("deduped_shards")
    params = dedup.read_params(shards)
    index = ingest.CorpusIndex(params, config.lsh_storage, ingest.corpus_id(shards))
    lake_dir = lake.artifact_dir("incoming_batch")
    # the corpus and earlier batches come from their persisted signatures: only this batch is hashed;
    # a re-run of this batch must not match itself, hence the exclude
    load = functools.partial(ingest.known_signatures, shards, lake_dir, params, exclude=key)
    rules = settings_of(config, clean.CleanRules)
    result = ingest.ingest(docs, index, rules, params, batch=key, load=load)
    info = {"key": key, "file": str(path), "documents_in": result.documents_in,
            "documents": len(result.kept), "removed_by_cleaning": result.documents_in - result.clean_report.documents_out,
            "duplicates": len(result.duplicates), "run_id": context.run_id}
    lake_dir.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(lake_dir / key)  # debris of a run killed mid-write
    with atomic_dir(lake_dir / key) as tmp:  # one partition replaced whole; the others untouched
        ingest.write_batch(result, tmp, info)
    version = lake.record("incoming_batch")
    splits = [result.split[d.doc_id] for d in result.kept]
    examples = [(d, o, k, f"{j:.3f}") for d, o, k, j in result.duplicates[:8]]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(lake_dir, version),
            "batch_path": dg.MetadataValue.path(str(lake_dir / key)),
            "file": dg.MetadataValue.path(str(path)),
            "documents_in": result.documents_in,
            "documents": len(result.kept),
            "train_documents": splits.count("train"),
            "validation_documents": splits.count("validation"),
            "removed_by_cleaning": info["removed_by_cleaning"],
            **{f"removed_{rule}": n for rule, n in result.clean_report.removed.items()},
            "duplicates_of_corpus_or_batch": len(result.duplicates),
            "batches_ingested": len(ingest.batch_dirs(lake_dir)),
            "lsh_index": "shared (Redis)" if config.lsh_storage else "in memory",
            "duplicates": dg.MetadataValue.md(markdown_table(["document", "duplicate of", "kind", "jaccard"], examples)),
        },
        check_results=[dg.AssetCheckResult(
            check_name="incoming_batch_adds_documents", passed=bool(result.kept), severity=dg.AssetCheckSeverity.WARN,
            metadata={"documents_in": result.documents_in, "documents": len(result.kept)})],
        data_version=dg.DataVersion(hashlib.sha256(ingest.documents_file(lake_dir / key).read_bytes()).hexdigest()[:24]),
    )
