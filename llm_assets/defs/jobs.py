"""Jobs: named selections people and sensors launch. The `llm_assets/lane` tag queues runs that must
not overlap (limits in the dagster.yaml `llm-assets init` writes)."""

import dagster as dg

TRAINING_LANE = {"llm_assets/lane": "training"}
INGEST_ASSETS = ("incoming_batch", "drift_report")
RETRAIN_ASSETS = ("sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint", "reward_model",
                  "quantized_model", "eval_report", "release")

data_job = dg.define_asset_job(
    "data_job",
    # incoming_batch is in the group too, but partitioned: ingest_job runs it per file
    selection=dg.AssetSelection.groups("data") - dg.AssetSelection.assets("incoming_batch"),
    description="Ingest, clean and deduplicate the corpus into versioned Parquet shards.",
)

pretrain_job = dg.define_asset_job(
    "pretrain_job",
    tags=TRAINING_LANE,
    selection=dg.AssetSelection.assets("tokenizer", "tokenized_shards", "base_checkpoint"),
    description="Train the tokenizer, pack the shards and pretrain the base checkpoint (expensive: never automatic).",
)

posttrain_job = dg.define_asset_job(
    "posttrain_job",
    tags=TRAINING_LANE,
    selection=dg.AssetSelection.assets("sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint",
                                       "reward_model"),
    description="Build the instruction and preference datasets, instruction-tune the base (LoRA), align it (DPO) "
                "and train the reward model.",
)

release_job = dg.define_asset_job(
    "release_job",
    selection=dg.AssetSelection.assets("quantized_model", "eval_report", "release"),
    description="Quantize the aligned model, evaluate every checkpoint side by side and release if the gates pass.",
)

ingest_job = dg.define_asset_job(
    "ingest_job",
    tags={"llm_assets/lane": "ingest"},
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    description="Ingest one incoming batch (a partition: clean, dedup against the corpus) and report its drift "
                "against the training corpus (incoming_data_sensor starts it).",
)

retrain_job = dg.define_asset_job(
    "retrain_job",
    tags=TRAINING_LANE,
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    description="Rebuild the post-training data with the newest batches, fine-tune, align, quantize, evaluate and "
                "release through the gates (drift_sensor starts it). The tokenizer and base stay: pretraining is a person's call.",
)

drift_job = dg.define_asset_job(
    "drift_job",
    selection=dg.AssetSelection.assets("drift_report"),
    description="Compare recent serving traffic with the training prompts (drift_report_schedule, daily).",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("eval_report"),
    description="Evaluate every checkpoint again on the current held-out data (eval_report_schedule, weekly).",
)
