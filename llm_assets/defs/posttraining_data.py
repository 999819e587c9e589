"""Group `training`, the datasets of post-training: sft_dataset (instruction chats) and
preference_dataset (prompt / chosen / rejected), from the corpus and the user's files. By default
preference_dataset's rejected replies are lora_checkpoint's own generations, so it runs after
lora_checkpoint and before aligned_checkpoint."""

import time
from collections import Counter

import dagster as dg
from pydantic import Field

from llm_assets.defs.data import bad_record_metadata
from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import dedup, ingest
from llm_assets.lib.data.bad_records import BadRecords, RecordRules
from llm_assets.lib.posttrain import instructions, posttrain_data, preferences, prose_tasks
from llm_assets.lib.posttrain.generation import generate_replies, repeats, rouge_l_scores, sample_replies
from llm_assets.lib.pretrain.model_dir import load_model, merged_dir
from llm_assets.lib.tokenizer.tokenizer import load_tokenizer
from llm_assets.lib.common.report import markdown_table


class SftDatasetConfig(dg.Config, RecordRules):
    include_corpus: bool = Field(True, description="Derive pairs from the corpus: Python modules give the docstring task (the instruction asks what a documented function or class does, the response is its docstring); other text of yours gives prose tasks from the text itself (continue a passage with its next sentences, write the opening of a headed section; lib/posttrain/prose_tasks.py).")
    max_corpus_pairs: int = Field(0, ge=0, description="Keep at most this many derived training pairs, spread evenly over the corpus (0 = all).")
    user_dir: str = Field("data/sft", description="Directory (relative to the project) of Alpaca `.json`/`.jsonl` and chat `.jsonl` files; all of them are used.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of user records held out, chosen by a stable hash of each record.")


class PreferenceDatasetConfig(dg.Config, RecordRules):
    include_corpus: bool = Field(True, description="Build pairs from the corpus-derived prompts of sft_dataset's tasks (docstring; continuation and section for prose), their reference reply being the docstring or the text's own words.")
    negatives: str = Field("ranked", description="How corpus pairs are built: ranked = both replies are lora_checkpoint's own (its greedy reply and `samples` samples per prompt), chosen the one closest to the docstring by ROUGE-L, rejected the farthest (on-policy pairs labelled by the reference, as in iterative RPO); on_policy = chosen the docstring, rejected the model's greedy reply (SPIN); hard = chosen the docstring, rejected another function's docstring, from the same module where possible.")
    max_train_pairs: int = Field(640, ge=0, description="ranked, on_policy: corpus training pairs generated for, spread evenly over the library (0 = all; each costs a generation). Pairs from ingested batches are always all kept. hard uses every pair.")
    max_validation_pairs: int = Field(200, ge=0, description="ranked, on_policy: held-out corpus pairs generated for, spread evenly over the validation modules (0 = all).")
    max_new_tokens: int = Field(48, ge=1, description="ranked, on_policy: tokens generated per reply at most (no repetition penalty: the model's own habits are what DPO must learn from).")
    samples: int = Field(4, ge=1, description="ranked: replies sampled per prompt beside the greedy one.")
    temperature: float = Field(0.3, gt=0, description="ranked: sampling temperature (no top-k or top-p). Low: on the demo LoRA model, best-of-5 ROUGE-L was 0.193 at 0.3, 0.196 at 0.6 and 0.150 at 1.0 (greedy 0.131), and at 1.0 most samples are not text.")
    min_rouge_gap: float = Field(0.05, ge=0, le=1, description="ranked: a reply is rejected only when it scores at least this much ROUGE-L F1 below the best (closer replies are no preference to learn).")
    pairs_per_prompt: int = Field(1, ge=1, description="ranked: pairs per prompt at most: the best reply against each of the worst ones (more pairs from the same generations).")
    batch_size: int = Field(64, ge=1, description="ranked, on_policy: prompts generated together (left-padded). 64 sampled the demo's replies 1.8x as fast as 16 (160 prompts x 4 samples: 13.5-15.4 s vs 25.3-26.0 s).")
    precision: str = Field("fp32", description="ranked, on_policy: fp32 | bf16 | auto (bf16 autocast where the device computes it natively) while generating. fp32 by default: exact and as fast here (bf16 decoding at batch 16 on the demo-size model measured no gain on this CPU).")
    user_dir: str = Field("data/preferences", description="Directory (relative to the project) of TRL `prompt/chosen/rejected` and HH-RLHF `chosen/rejected` `.jsonl` files.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of user records held out, chosen by a stable hash of each record.")
    seed: int = Field(0, description="hard: seeds the choice of negatives.")


NEGATIVES = ("ranked", "on_policy", "hard")


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
    role/content lists, `source`, `origin`, `module`). Corpus-derived chats: docstring tasks from
    Python modules, continuation and section tasks from other text (`derivations` counts each);
    validation chats come only from documents of the validation split, which pretraining never saw.
    User records that cannot be used are dropped and counted per reason (`bad_records`)."""
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    derived: dict[str, list[instructions.InstructionPair]] = {"train": [], "validation": []}
    if config.include_corpus:
        derived = {"train": _corpus_pairs(lake, "train", config.max_corpus_pairs),
                   "validation": _corpus_pairs(lake, "validation")}
        for split, pairs in derived.items():
            splits[split] += posttrain_data.derived_chat_rows(pairs)
    files, bad = posttrain_data.user_files(lake.root / config.user_dir), BadRecords()
    for path in files:
        # unusable records dropped and counted; malformed JSON, or too many unusable, fails naming file and line
        chats, file_bad = posttrain_data.read_sft_file(path, config.max_bad_record_share)
        bad.add(file_bad)
        for messages, source in chats:
            split = "validation" if posttrain_data.held_out(messages, config.validation_fraction) else "train"
            splits[split].append(posttrain_data.chat_row(messages, source, path.name))
    if bad.total:
        context.log.warning(f"dropped {bad.total} unusable user records: {dict(bad.dropped)}")
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"sft_dataset: no {split} examples (include_corpus={config.include_corpus}: "
                             f"{len(derived[split])} pairs derived from the {split} documents; "
                             f"{len(files)} user files in {config.user_dir})")
    out = lake.artifact_dir("sft_dataset")
    with lake.write("sft_dataset") as tmp:
        for split, rows in splits.items():
            posttrain_data.write_chats(tmp, split, rows)
    version = lake.record("sft_dataset")

    origins = sorted({r["origin"] for rows in splits.values() for r in rows})
    counts = {s: Counter(r["origin"] for r in rows) for s, rows in splits.items()}
    tasks = {s: Counter(p.task for p in pairs) for s, pairs in derived.items()}
    replies = [len(r["messages"][-1]["content"]) for r in splits["train"]]
    samples = [(r["source"], _chat_preview(r["messages"])) for r in splits["validation"][:: max(1, len(splits["validation"]) // 3)][:3]]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "train_examples": len(splits["train"]),
            "validation_examples": len(splits["validation"]),
            "user_files": len(files),
            **bad_record_metadata(bad),
            "incoming_batch_documents": _batch_documents(lake),
            "mean_response_chars": sum(replies) / len(replies),
            "by_origin": dg.MetadataValue.md(markdown_table(
                ["origin", "train", "validation"], [(o, counts["train"][o], counts["validation"][o]) for o in origins])),
            "derivations": dg.MetadataValue.md(markdown_table(
                ["derivation", "train", "validation"],
                [(t, tasks["train"][t], tasks["validation"][t]) for t in ("docstring", *prose_tasks.TASKS)])),
            "samples": dg.MetadataValue.md(markdown_table(["source", "chat (held out)"], samples)),
        },
        data_version=dg.DataVersion(version.md5),
    )


def _on_policy(context: dg.AssetExecutionContext, config: PreferenceDatasetConfig, lake: LakeResource,
               pairs: dict[str, list[instructions.InstructionPair]]) -> tuple[dict[str, list], dict]:
    """(preference pairs per split with rejected = lora_checkpoint's greedy reply, generation figures)."""
    model_dir = merged_dir(lake.artifact_dir("lora_checkpoint"))
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    out, replies, dropped, start = {}, [], 0, time.perf_counter()
    for split, split_pairs in pairs.items():
        context.log.info(f"generating {len(split_pairs)} {split} replies with {model_dir}")
        generated = generate_replies(model, tokenizer, [instructions.to_messages(p)[:-1] for p in split_pairs],
                                     config.max_new_tokens, config.batch_size, precision=config.precision)
        out[split], identical = preferences.on_policy_preferences(split_pairs, generated)
        replies += generated
        dropped += identical
    seconds = time.perf_counter() - start
    figures = {"generated": len(replies), "on_policy_identical": dropped, "generation_seconds": seconds,
               "rejected_repeats_share": sum(map(repeats, replies)) / max(1, len(replies)),
               "mean_rejected_chars": sum(len(r.strip()) for r in replies) / max(1, len(replies)),
               "empty_rejected": sum(not r.strip() for r in replies)}
    construction = (f"Corpus pairs: chosen = the reference reply (the docstring; for prose, the text's own words), "
                    f"rejected = the greedy reply of lora_checkpoint (merged) to the same prompt (at most "
                    f"{config.max_new_tokens} new tokens, no repetition penalty, precision {config.precision}); "
                    f"replies equal to the reference dropped. Train pairs from train documents, held-out pairs from "
                    f"validation documents only.")
    return out, {**figures, "construction": construction}


def _ranked(context: dg.AssetExecutionContext, config: PreferenceDatasetConfig, lake: LakeResource,
            pairs: dict[str, list[instructions.InstructionPair]]) -> tuple[dict[str, list], dict]:
    """(preference pairs per split between lora_checkpoint's own replies, ranked by ROUGE-L against
    the docstring; generation figures)."""
    model_dir = merged_dir(lake.artifact_dir("lora_checkpoint"))
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    out, dropped, gaps, best, greedy_best, start = {}, 0, [], [], 0, time.perf_counter()
    for split, split_pairs in pairs.items():
        context.log.info(f"generating 1 greedy + {config.samples} sampled {split} replies to {len(split_pairs)} prompts")
        prompts = [instructions.to_messages(p)[:-1] for p in split_pairs]
        greedy = generate_replies(model, tokenizer, prompts, config.max_new_tokens, config.batch_size,
                                  precision=config.precision)
        sampled = sample_replies(model, tokenizer, prompts, config.samples, config.temperature, config.max_new_tokens,
                                 config.batch_size, seed=len(out), precision=config.precision)
        candidates = [[g, *s] for g, s in zip(greedy, sampled)]
        scores = [rouge_l_scores(c, [p.output] * len(c)) for p, c in zip(split_pairs, candidates)]
        out[split], no_gap = preferences.ranked_preferences(split_pairs, candidates, scores, config.min_rouge_gap,
                                                            config.pairs_per_prompt)
        dropped += no_gap
        gaps += [max(m) - min(m) for m in scores]
        best += [max(m) for m in scores]
        greedy_best += sum(m[0] == max(m) for m in scores)
    construction = (f"Corpus pairs: both replies are lora_checkpoint's (merged) own, to the same prompt: its greedy "
                    f"reply and {config.samples} samples at temperature {config.temperature} (at most "
                    f"{config.max_new_tokens} new tokens, no repetition penalty), scored by ROUGE-L F1 against the "
                    f"reference reply (the docstring; for prose, the text's own words); chosen = the best, rejected = "
                    f"the worst ones (at most {config.pairs_per_prompt} per prompt) that score at least "
                    f"{config.min_rouge_gap} lower. Train pairs from train documents, held-out pairs from validation "
                    f"documents only.")
    n = max(1, len(gaps))
    return out, {"generated": n * (1 + config.samples), "prompts_without_pair": dropped,
                 "generation_seconds": time.perf_counter() - start, "mean_rouge_gap": sum(gaps) / n,
                 "mean_best_rouge": sum(best) / n, "greedy_is_best_share": greedy_best / n, "construction": construction}


def _hard(config: PreferenceDatasetConfig, pairs: dict[str, list[instructions.InstructionPair]]) -> tuple[dict[str, list], dict]:
    """(preference pairs per split with rejected = another definition's docstring, figures)."""
    out, skipped = {}, 0
    for split, split_pairs in pairs.items():
        out[split], no_negative = preferences.derive_preferences(split_pairs, seed=config.seed)
        skipped += no_negative
    construction = ("Corpus pairs: chosen = the reference reply, rejected = the reply of another definition of the "
                    "same module where possible, else the same package, else any (for prose: another passage of the "
                    "same document, else of the same file); negatives within each split.")
    return out, {"skipped_no_negative": skipped, "construction": construction}


@dg.asset(group_name="training", kinds={"parquet", "dvc"}, deps=["deduped_shards", "incoming_batch", "lora_checkpoint"])
def preference_dataset(context: dg.AssetExecutionContext, config: PreferenceDatasetConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Preference pairs for DPO, `train.parquet` and `validation.parquet` (`prompt` as messages,
    `chosen`, `rejected`, `source`, `negative`). Corpus pairs (by `negatives`): two of
    lora_checkpoint's own replies ranked by ROUGE-L against the docstring (ranked, the default), the
    docstring over the model's greedy reply (on_policy) or over another function's docstring (hard),
    built within each split so held-out pairs share nothing with training. User files' pairs are
    added as labelled; records that cannot be used are dropped and counted per reason (`bad_records`)."""
    if config.negatives not in NEGATIVES:
        raise ValueError(f"negatives: must be one of {NEGATIVES} (got {config.negatives!r})")
    splits: dict[str, list[preferences.PreferencePair]] = {"train": [], "validation": []}
    figures: dict = {"construction": "No corpus pairs (include_corpus is false)."}
    if config.include_corpus:
        if config.negatives in ("ranked", "on_policy"):
            caps = {"train": config.max_train_pairs, "validation": config.max_validation_pairs}
            build = _ranked if config.negatives == "ranked" else _on_policy
            derived, figures = build(context, config, lake, {s: _corpus_pairs(lake, s, caps[s]) for s in splits})
        else:
            derived, figures = _hard(config, {s: _corpus_pairs(lake, s) for s in splits})
        for split in splits:
            splits[split] += derived[split]
    files, bad = posttrain_data.user_files(lake.root / config.user_dir), BadRecords()
    for path in files:
        # unusable records dropped and counted; malformed JSON, or too many unusable, fails naming file and line
        pairs, file_bad = posttrain_data.read_preference_file(path, config.max_bad_record_share)
        bad.add(file_bad)
        for pair in pairs:
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
    if bad.total:
        context.log.warning(f"dropped {bad.total} unusable user records: {dict(bad.dropped)}")
    out = lake.artifact_dir("preference_dataset")
    with lake.write("preference_dataset") as tmp:
        for split, pairs in splits.items():
            posttrain_data.write_preferences(tmp, split, pairs)
    version = lake.record("preference_dataset")

    tiers = Counter(p.negative or "user file" for pairs in splits.values() for p in pairs)
    held = splits["validation"]
    samples = [(preferences.prompt_messages(p.prompt)[-1]["content"][:200], p.chosen[:200], p.rejected[:200],
                p.negative or p.source)
               for p in held[:: max(1, len(held) // 3)][:3]]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "negatives_from": config.negatives,
            "construction": dg.MetadataValue.text(figures.pop("construction") + " User files: pairs as labelled."),
            **figures,  # numbers: the UI charts them across materializations
            "train_pairs": len(splits["train"]),
            "validation_pairs": len(splits["validation"]),
            "dropped_identical": sum(dropped.values()) + bad.dropped["identical_replies"],
            "user_files": len(files),
            **bad_record_metadata(bad),
            "incoming_batch_documents": _batch_documents(lake),
            "negatives": dg.MetadataValue.md(markdown_table(["rejected reply taken from", "pairs"], sorted(tiers.items()))),
            "samples": dg.MetadataValue.md(markdown_table(["prompt", "chosen", "rejected", "negative"], samples)),
        },
        data_version=dg.DataVersion(version.md5),
    )
