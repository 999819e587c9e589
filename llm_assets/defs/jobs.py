"""Jobs: named selections people and sensors launch."""

import dagster as dg

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.groups("data"),
    description="Ingest, clean and deduplicate the corpus into versioned Parquet shards.",
)

pretrain_job = dg.define_asset_job(
    "pretrain_job",
    selection=dg.AssetSelection.assets("tokenizer", "tokenized_shards", "base_checkpoint"),
    description="Train the tokenizer, pack the shards and pretrain the base checkpoint (expensive: never automatic).",
)

posttrain_job = dg.define_asset_job(
    "posttrain_job",
    selection=dg.AssetSelection.assets("sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint"),
    description="Build the instruction and preference datasets, instruction-tune the base (LoRA) and align it (DPO).",
)

release_job = dg.define_asset_job(
    "release_job",
    selection=dg.AssetSelection.assets("quantized_model", "eval_report", "release"),
    description="Quantize the aligned model, evaluate every checkpoint side by side and release if the gates pass.",
)
