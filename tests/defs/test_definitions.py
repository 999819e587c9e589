import dagster as dg

from llm_assets.definitions import defs

DATA_ASSETS = {"raw_corpus", "clean_corpus", "deduped_shards"}
GROUPS = {"raw_corpus": "data", "clean_corpus": "data", "deduped_shards": "data", "tokenizer": "tokenizer",
          "tokenized_shards": "tokenizer", "base_checkpoint": "training", "sft_dataset": "training",
          "preference_dataset": "training", "lora_checkpoint": "training", "aligned_checkpoint": "training",
          "quantized_model": "release", "eval_report": "evaluation", "release": "release", "drift_report": "monitoring",
          "incoming_batch": "data"}


def test_assets_groups_checks_and_jobs():
    d = defs()
    graph = d.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.materializable_asset_keys}
    assert set(GROUPS) <= keys
    for name, group in GROUPS.items():
        assert graph.get(dg.AssetKey(name)).group_name == group
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("deduped_shards")).parent_keys} == {"clean_corpus"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("base_checkpoint")).parent_keys} == {
        "tokenizer", "tokenized_shards"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("lora_checkpoint")).parent_keys} == {
        "sft_dataset", "base_checkpoint"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("aligned_checkpoint")).parent_keys} == {
        "preference_dataset", "lora_checkpoint", "base_checkpoint", "sft_dataset", "reward_model"}  # grpo scores with it
    assert graph.get(dg.AssetKey("serving_log")).is_observable
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("drift_report")).parent_keys} == {
        "serving_log", "sft_dataset", "incoming_batch"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("sft_dataset")).parent_keys} == {
        "deduped_shards", "incoming_batch"}
    assert graph.get(dg.AssetKey("incoming_batch")).is_partitioned
    checks = {c.name for c in graph.asset_check_keys}
    assert {"clean_corpus_keeps_most_documents", "deduped_shards_splits_disjoint", "tokenizer_roundtrip",
            "base_checkpoint_beats_unigram", "lora_improves_reply_loss", "aligned_preference_accuracy",
            "quantized_perplexity_within_budget", "aligned_beats_lora", "generation_non_empty", "replies_do_not_loop",
            "incoming_batch_adds_documents"} <= checks
    assert "lake" in d.resources


# What each job runs, and the lane it queues in (None: runs alongside anything).
JOBS = {
    "data_job": ({"raw_corpus", "clean_corpus", "deduped_shards"}, None),
    "pretrain_job": ({"tokenizer", "tokenized_shards", "base_checkpoint"}, "training"),
    "posttrain_job": ({"sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint", "reward_model"},
                      "training"),
    "release_job": ({"quantized_model", "eval_report", "release"}, None),
    "ingest_job": ({"incoming_batch", "drift_report"}, "ingest"),
    # retraining rebuilds everything after the base; the tokenizer and base_checkpoint are a person's call
    "retrain_job": ({"sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint", "reward_model",
                     "quantized_model", "eval_report", "release"}, "training"),
    "drift_job": ({"drift_report"}, None),
    "evaluation_job": ({"eval_report"}, None),
}


def test_each_job_runs_exactly_its_assets_in_its_lane():
    d = defs()
    assert {j.name for j in d.resolve_all_job_defs() if not j.name.startswith("__")} == set(JOBS)
    for name, (assets, lane) in JOBS.items():
        job = d.resolve_job_def(name)
        assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == assets, name
        assert job.tags.get("llm_assets/lane") == lane, name
        assert job.description, name


def test_string_selections_work():
    # dvc pins antlr 4.9 and dagster's selection parser needs 4.13 (see the Makefile): this fails
    # with "ord() expected string of length 1" when the environment is set up wrongly.
    graph = defs().resolve_asset_graph()
    def names(selection: str) -> set[str]:
        return {k.to_user_string() for k in dg.AssetSelection.from_string(selection).resolve(graph)}

    assert DATA_ASSETS <= names("group:data")
    assert names("+deduped_shards") == {"clean_corpus", "deduped_shards"}
