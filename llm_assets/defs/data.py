"""Group `data`: raw_corpus -> clean_corpus -> deduped_shards, each a DVC-versioned directory."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import clean, corpus, dedup
from llm_assets.lib.data.bad_records import BadRecords
from llm_assets.lib.common.report import histogram_markdown, markdown_table
from llm_assets.lib.common.settings import settings_of


class CorpusConfig(dg.Config, corpus.CorpusSources):
    """raw_corpus's launchpad: the sources of lib/data/corpus.py (raw_dir is the project's data/raw/)."""


class CleanConfig(dg.Config, clean.CleanRules):
    """clean_corpus's launchpad: the quality rules of lib/data/clean.py."""


class DedupConfig(dg.Config, dedup.DedupParams):
    """deduped_shards' launchpad: the dedup parameters of lib/data/dedup.py plus the shard size."""

    shard_target_mb: float = Field(8.0, description="Target uncompressed text per Parquet shard, in MB.")


def bad_record_metadata(bad: BadRecords) -> dict:
    """User records dropped as unusable (raw_corpus, sft_dataset, preference_dataset): the count and
    share as numbers, and per reason the first file:line, where a person looks to fix or accept them."""
    return {"dropped_bad_records": bad.total, "bad_record_share": bad.share,
            "bad_records": dg.MetadataValue.md(markdown_table(["reason", "records dropped", "first (file:line)"],
                                                              bad.rows()) if bad.total else "none")}


@dg.asset(group_name="data", kinds={"parquet", "dvc"})
def raw_corpus(context: dg.AssetExecutionContext, config: CorpusConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Documents from the configured sources (default: this Python's standard library, sources,
    tests and docs; plus .txt/.md/.jsonl/.parquet files under data/raw/) as one Parquet file. A
    .txt/.md file longer than max_document_chars becomes documents of about split_target_chars,
    cut at paragraph boundaries (`<file>#chars=<start>-<end>`). JSONL lines and Parquet rows
    without usable text are dropped and counted (`bad_records`); a file fails when they are more
    than max_bad_record_share of it."""
    docs, stats = corpus.collect_documents(settings_of(config, corpus.CorpusSources), lake.raw_dir)
    if not docs:
        raise dg.Failure(f"raw_corpus: no documents (stdlib {'on' if config.include_stdlib else 'off'}, "
                         f"no files matching {config.user_globs} under {lake.raw_dir})")
    out = lake.artifact_dir("raw_corpus")
    with lake.write("raw_corpus") as tmp:
        corpus.write_documents(docs, corpus.corpus_file(tmp))
    version = lake.record("raw_corpus")
    rows = [(src, n) for src, n in sorted(stats.by_source.items())]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "documents": stats.documents,
            "text_bytes": stats.bytes,
            "user_files": stats.files_read,
            "user_files_split": stats.files_split,
            **bad_record_metadata(stats.bad),
            "invalid_utf8_bytes": stats.invalid_utf8_bytes,
            "documents_with_invalid_utf8": stats.documents_with_invalid_utf8,
            "by_source": dg.MetadataValue.md(markdown_table(["source", "documents"], rows)),
        },
        data_version=dg.DataVersion(version.md5),
    )


@dg.asset(
    group_name="data",
    kinds={"parquet", "dvc"},
    deps=[raw_corpus],
    check_specs=[dg.AssetCheckSpec("clean_corpus_keeps_most_documents", asset="clean_corpus",
                                   description="Warns when the filters remove more than half the documents.")],
)
def clean_corpus(config: CleanConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Normalized text (NFC, LF, no control characters, no trailing whitespace) after the quality
    filters; metadata counts what each rule removed, with examples."""
    docs = corpus.read_documents(corpus.corpus_file(lake.artifact_dir("raw_corpus")))
    kept, report = clean.clean_documents(docs, settings_of(config, clean.CleanRules))
    out = lake.artifact_dir("clean_corpus")
    with lake.write("clean_corpus") as tmp:
        corpus.write_documents(kept, corpus.corpus_file(tmp))
    version = lake.record("clean_corpus")
    rows = [(rule, report.removed.get(rule, 0), ", ".join(report.examples.get(rule, [])))
            for rule in clean.RULES]
    removed_share = 1 - report.documents_out / report.documents_in
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "documents_in": report.documents_in,
            "documents": report.documents_out,
            "removed_share": removed_share,
            "chars": report.chars_out,
            **{f"removed_{rule}": report.removed.get(rule, 0) for rule in clean.RULES},
            "filters": dg.MetadataValue.md(markdown_table(["rule", "removed", "examples"], rows)),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[dg.AssetCheckResult(
            check_name="clean_corpus_keeps_most_documents", passed=removed_share <= 0.5,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"threshold": 0.5, "observed_removed_share": removed_share})],
    )


@dg.asset(
    group_name="data",
    kinds={"parquet", "dvc"},
    deps=[clean_corpus],
    check_specs=[dg.AssetCheckSpec(
        "deduped_shards_splits_disjoint", asset="deduped_shards", blocking=True,
        description="Both splits are non-empty and no document or duplicate cluster appears in both.")],
)
def deduped_shards(config: DedupConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Exact and MinHash-LSH near-duplicate removal, then Parquet shards of a target size with a
    deterministic train/validation split that keeps each duplicate cluster on one side. A corpus too
    small for that split is split by document or, when one document is left, by its paragraphs:
    `split_grain` and `split_reason` say which and why."""
    docs = corpus.read_documents(corpus.corpus_file(lake.artifact_dir("clean_corpus")))
    params = settings_of(config, dedup.DedupParams)
    result = dedup.deduplicate(docs, params)
    out = lake.artifact_dir("deduped_shards")
    with lake.write("deduped_shards") as tmp:
        manifest = dedup.write_shards(result, tmp, config.shard_target_mb, params)
    version = lake.record("deduped_shards")
    check = _splits_disjoint(out)
    near = [d for d in result.duplicates if d.kind == "near"]
    examples = sorted(near, key=lambda d: d.jaccard)[:: max(1, len(near) // 8)][:8]
    split_rows = [(s, v["documents"], v["text_bytes"], v["shards"]) for s, v in manifest["splits"].items()]
    metadata = {
        **artifact_metadata(out, version),
        "documents_in": result.documents_in,
        "documents": len(result.kept),
        "duplicate_rate": result.duplicate_rate,
        "exact_duplicates": result.exact_duplicates,
        "near_duplicates": result.near_duplicates,
        "train_documents": manifest["splits"]["train"]["documents"],
        "validation_documents": manifest["splits"]["validation"]["documents"],
        "split_grain": result.split_grain,
        "split_reason": result.split_reason or f"{len(result.kept)} documents: the hash rule filled both splits",
        "shards": len(manifest["shards"]),
        "splits": dg.MetadataValue.md(markdown_table(["split", "documents", "text bytes", "shards"], split_rows)),
        "example_clusters": dg.MetadataValue.md(markdown_table(
            ["kept document", "removed near duplicate", "estimated Jaccard"],
            [(d.kept_doc_id, d.doc_id, d.jaccard) for d in examples])),
    }
    if near:
        metadata["jaccard_histogram"] = dg.MetadataValue.md(histogram_markdown(
            [d.jaccard for d in near], "near-duplicate pairs", "estimated Jaccard with the kept document"))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version.md5), check_results=[check])


def _splits_disjoint(shard_dir: Path) -> dg.AssetCheckResult:
    """Reads the written shards back: the gate checks the artifact, not the in-memory result."""
    ids = {s: set(dedup.read_split(shard_dir, s).column("doc_id").to_pylist())
           if dedup.shard_files(shard_dir, s) else set() for s in ("train", "validation")}
    overlap = ids["train"] & ids["validation"]
    removed = set(dedup.read_duplicates(shard_dir).column("doc_id").to_pylist())
    leaked = removed & (ids["train"] | ids["validation"])
    manifest = dedup.read_manifest(shard_dir)
    passed = bool(ids["train"]) and bool(ids["validation"]) and not overlap and not leaked
    return dg.AssetCheckResult(
        check_name="deduped_shards_splits_disjoint", passed=passed,
        metadata={"train_documents": len(ids["train"]), "validation_documents": len(ids["validation"]),
                  "documents_in_both_splits": len(overlap), "removed_duplicates_still_present": len(leaked),
                  "threshold": 0, "shards": len(manifest["shards"]), "split_grain": manifest["split"]["grain"]})
