"""Group `training`, the datasets of post-training: sft_dataset (instruction chats) and
preference_dataset (prompt / chosen / rejected), from the corpus and the user's files."""

import json
from collections import Counter

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import dedup, ingest
from llm_assets.lib.posttrain import instructions, posttrain_data, preferences
from llm_assets.lib.common.report import markdown_table


class SftDatasetConfig(dg.Config):
    include_corpus: bool = Field(True, description="Derive pairs from the corpus's Python modules: the instruction asks what a documented function or class does, the response is its docstring.")
    max_corpus_pairs: int = Field(0, ge=0, description="Keep at most this many derived training pairs, spread evenly over the library (0 = all).")
    user_dir: str = Field("data/sft", description="Directory (relative to the project) of Alpaca `.json`/`.jsonl` and chat `.jsonl` files; all of them are used.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of user records held out, chosen by a stable hash of each record.")


class PreferenceDatasetConfig(dg.Config):
    include_corpus: bool = Field(True, description="Derive pairs from the corpus: chosen is a function's own docstring, rejected one of another function, from the same module where possible.")
    user_dir: str = Field("data/preferences", description="Directory (relative to the project) of TRL `prompt/chosen/rejected` and HH-RLHF `chosen/rejected` `.jsonl` files.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of user records held out, chosen by a stable hash of each record.")
    seed: int = Field(0, description="Seeds the choice of negatives.")


def _corpus_pairs(lake: LakeResource, split: str, max_pairs: int = 0) -> list[instructions.InstructionPair]:
    """Pairs from the shards (at most `max_pairs`, spread evenly) plus every pair from the ingested
    incoming batches: the newest data is never capped away, a retrain after a batch must see it."""
    rows = dedup.read_split(lake.artifact_dir("deduped_shards"), split).to_pylist()
    pairs = instructions.derive_pairs(((r["doc_id"], r["text"]) for r in rows), max_pairs=max_pairs)
    batches = ingest.read_batches(lake.artifact_dir("incoming_batch"), split)
    return pairs + instructions.derive_pairs(zip(batches["doc_id"].to_pylist(), batches["text"].to_pylist()))


def _batch_documents(lake: LakeResource) -> int:
    return ingest.read_batches(lake.artifact_dir("incoming_batch")).num_rows


def _chat_preview(messages: list[dict], width: int = 160) -> str:
    return " / ".join(f"{m['role']}: {m['content'][:width]}" for m in messages)


@dg.asset(group_name="training", kinds={"parquet", "dvc"}, deps=["deduped_shards", "incoming_batch"])
def sft_dataset(context: dg.AssetExecutionContext, config: SftDatasetConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Instruction chats for fine-tuning, `train.parquet` and `validation.parquet` (`messages` as
    role/content lists, `source`, `origin`, `module`). Corpus-derived validation chats come only from
    modules of the validation split, which pretraining never saw."""
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    if config.include_corpus:
        train = _corpus_pairs(lake, "train", config.max_corpus_pairs)
        splits["train"] += posttrain_data.derived_chat_rows(train)
        splits["validation"] += posttrain_data.derived_chat_rows(_corpus_pairs(lake, "validation"))
    files = posttrain_data.user_files(lake.root / config.user_dir)
    for path in files:
        for messages, source in posttrain_data.read_sft_file(path):  # malformed: file and line named
            split = "validation" if posttrain_data.held_out(messages, config.validation_fraction) else "train"
            splits[split].append(posttrain_data.chat_row(messages, source, path.name))
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"sft_dataset: no {split} examples (include_corpus={config.include_corpus}, "
                             f"{len(files)} user files in {config.user_dir})")
    out = lake.artifact_dir("sft_dataset")
    with lake.write("sft_dataset") as tmp:
        for split, rows in splits.items():
            posttrain_data.write_chats(tmp, split, rows)
    version = lake.record("sft_dataset")

    origins = sorted({r["origin"] for rows in splits.values() for r in rows})
    counts = {s: Counter(r["origin"] for r in rows) for s, rows in splits.items()}
    replies = [len(r["messages"][-1]["content"]) for r in splits["train"]]
    samples = [(r["source"], _chat_preview(r["messages"])) for r in splits["validation"][:: max(1, len(splits["validation"]) // 3)][:3]]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "train_examples": len(splits["train"]),
            "validation_examples": len(splits["validation"]),
            "user_files": len(files),
            "incoming_batch_documents": _batch_documents(lake),
            "mean_response_chars": sum(replies) / len(replies),
            "by_origin": dg.MetadataValue.md(markdown_table(
                ["origin", "train", "validation"], [(o, counts["train"][o], counts["validation"][o]) for o in origins])),
            "samples": dg.MetadataValue.md(markdown_table(["source", "chat (held out)"], samples)),
        },
        data_version=dg.DataVersion(version.md5),
    )


@dg.asset(group_name="training", kinds={"parquet", "dvc"}, deps=["deduped_shards", "incoming_batch"])
def preference_dataset(context: dg.AssetExecutionContext, config: PreferenceDatasetConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Preference pairs for DPO, `train.parquet` and `validation.parquet` (`prompt` as messages,
    `chosen`, `rejected`, `source`, `negative`). Corpus-derived pairs take their negatives within
    their own split, so held-out pairs share nothing with training."""
    splits: dict[str, list[preferences.PreferencePair]] = {"train": [], "validation": []}
    skipped = 0
    if config.include_corpus:
        for split in splits:
            derived, no_negative = preferences.derive_preferences(_corpus_pairs(lake, split), seed=config.seed)
            splits[split] += derived
            skipped += no_negative
    files = posttrain_data.user_files(lake.root / config.user_dir)
    for path in files:
        for pair in posttrain_data.read_preference_file(path):  # malformed: file and line named
            key = [pair.prompt, pair.chosen, pair.rejected]
            splits["validation" if posttrain_data.held_out(key, config.validation_fraction) else "train"].append(pair)
    dropped = {}
    for split in splits:
        splits[split], dropped[split] = preferences.drop_identical(splits[split])
        if not splits[split]:
            raise ValueError(f"preference_dataset: no {split} pairs (include_corpus={config.include_corpus}, "
                             f"{len(files)} user files in {config.user_dir})")
    if sum(dropped.values()):
        context.log.warning(f"dropped {sum(dropped.values())} pairs whose chosen equals rejected: {dropped}")
    out = lake.artifact_dir("preference_dataset")
    with lake.write("preference_dataset") as tmp:
        for split, pairs in splits.items():
            posttrain_data.write_preferences(tmp, split, pairs)
    version = lake.record("preference_dataset")

    tiers = Counter(p.negative or "user file" for pairs in splits.values() for p in pairs)
    sample = splits["validation"][0]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "train_pairs": len(splits["train"]),
            "validation_pairs": len(splits["validation"]),
            "dropped_identical": sum(dropped.values()),
            "skipped_no_negative": skipped,
            "user_files": len(files),
            "incoming_batch_documents": _batch_documents(lake),
            "negatives": dg.MetadataValue.md(markdown_table(["rejected reply taken from", "pairs"], sorted(tiers.items()))),
            "sample": dg.MetadataValue.md(markdown_table(["field", "text"], [
                ("prompt", json.dumps(sample.prompt)[:300]), ("chosen", sample.chosen[:300]),
                ("rejected", sample.rejected[:300]), ("source", sample.source)])),
        },
        data_version=dg.DataVersion(version.md5),
    )
