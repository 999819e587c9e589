"""In-process materialization of the data and tokenizer groups on a throwaway project with real DVC."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from transformers import AutoTokenizer

from llm_assets.defs.data import clean_corpus, deduped_shards, raw_corpus
from llm_assets.defs.tokenizer import tokenized_shards, tokenizer
from llm_assets.lib.data import dedup
from llm_assets.lib.tokenizer.packing import load_tokens
from llm_assets.lib.tokenizer.tokenizer import SPECIAL_TOKENS

from helpers import lock_md5, materialize_assets

ASSETS = [raw_corpus, clean_corpus, deduped_shards, tokenizer, tokenized_shards]


def test_tokenizer_and_packed_shards(project, tiny_run_config):
    run_config = {"ops": {**tiny_run_config["ops"], "tokenizer": {"config": {"vocab_size": 512}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_assets(ASSETS, project, run_config, instance=instance)
        assert result.success
        for asset in ("tokenizer", "tokenized_shards"):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            md = event.asset_materialization.metadata
            assert md["dvc_md5"].value == lock_md5(project, asset)
            assert event.asset_materialization.tags["dagster/data_version"] == md["dvc_md5"].value
            assert Path(md["path"].value) == project / "data/lake" / asset

    tok_md = result.asset_materializations_for_node("tokenizer")[0].metadata
    assert tok_md["vocab_size"].value == 512
    assert 1.5 < tok_md["bytes_per_token"].value < 4.0
    # The figure is the saved artifact's compression of the validation shards, recomputed here.
    saved = AutoTokenizer.from_pretrained(project / "data/lake/tokenizer")
    texts = dedup.read_split(project / "data/lake/deduped_shards", "validation").column("text").to_pylist()
    tokens = sum(len(ids) for ids in saved(texts, add_special_tokens=False)["input_ids"])
    assert tok_md["bytes_per_token"].value == pytest.approx(sum(len(t.encode()) for t in texts) / tokens)
    assert tok_md["training_seconds"].value > 0
    assert "| <\\|eos\\|> | 1 |" in tok_md["special_tokens"].value
    assert "tokens" in tok_md["example"].value
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    roundtrip = checks["tokenizer_roundtrip"]
    assert roundtrip.passed
    assert roundtrip.metadata["observed_failures"].value == 0
    assert roundtrip.metadata["documents_checked"].value > 0

    tok = AutoTokenizer.from_pretrained(str(project / "data/lake/tokenizer"), local_files_only=True)
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(7))

    packed = project / "data/lake/tokenized_shards"
    meta = json.loads((packed / "meta.json").read_text())
    dedup_md = result.asset_materializations_for_node("deduped_shards")[0].metadata
    shards_md = result.asset_materializations_for_node("tokenized_shards")[0].metadata
    for split in ("train", "validation"):
        ids = load_tokens(packed, split)
        assert meta["splits"][split]["tokens"] == len(ids) == (packed / f"{split}.bin").stat().st_size // 2
        assert shards_md[f"{split}_tokens"].value == len(ids)
        assert shards_md[f"{split}_documents"].value == dedup_md[f"{split}_documents"].value
        assert int((ids == tok.eos_token_id).sum()) == meta["splits"][split]["documents"]
        assert int(ids.max()) < 512 and ids.dtype == np.uint16
    assert shards_md["dtype"].value == meta["dtype"] == "uint16"
    assert shards_md["bytes_per_token"].value == pytest.approx(tok_md["bytes_per_token"].value, rel=0.2)
    assert "| train |" in shards_md["splits"].value

    # the last assets rerun alone, on the artifacts recorded above
    cfg = {"ops": {"tokenizer": {"config": {"vocab_size": 100}}}}
    failed = materialize_assets(ASSETS, project, cfg, selection=[tokenizer])
    assert not failed.success
    error = failed.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "vocab_size must exceed 263" in error
    assert len(AutoTokenizer.from_pretrained(str(project / "data/lake/tokenizer"))) == 512  # untouched

    # a split missing upstream fails packing by name and keeps the previous packed version
    before = (packed / "meta.json").read_bytes()
    for shard in (project / "data/lake/deduped_shards").glob("validation-*.parquet"):
        shard.unlink()
    failed = materialize_assets(ASSETS, project, {}, selection=[tokenized_shards])
    assert not failed.success
    assert "no validation shards" in failed.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert (packed / "meta.json").read_bytes() == before
