"""Jobs: named selections people and sensors launch. Training jobs join as their stages land."""

import dagster as dg

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.groups("data"),
    description="Ingest, clean and deduplicate the corpus into versioned Parquet shards.",
)
