"""gguf_model and onnx_model materialized against a project whose lake holds the trained tiny model
as aligned_checkpoint and its token streams as tokenized_shards (what the graph upstream writes):
files, figures per type, gate and DVC record."""

import json
import shutil

import dagster as dg
import pytest

from helpers import lock_md5, materialize_assets, metadata
from llm_assets.defs.export import gguf_model, onnx_model
from llm_assets.lib.release.llama_engine import served_gguf
from llm_assets.lib.tokenizer import packing

SMALL = {"perplexity_windows": 4, "speed_prompts": 2, "speed_tokens": 8, "threads": 1}


@pytest.fixture(scope="module")
def built(project_factory, tiny_teacher):
    model_dir, (train, valid), _ = tiny_teacher
    project = project_factory("export")
    lake = project / "data/lake"
    shutil.copytree(model_dir, lake / "aligned_checkpoint/merged")
    packing.write_streams(lake / "tokenized_shards", {"train": train, "validation": valid}, 512, 0, 1, 2)
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"gguf_model": {"config": SMALL}, "onnx_model": {"config": SMALL}}}
    result = materialize_assets([gguf_model, onnx_model], project, run_config, instance=instance)
    return project, instance, result


def test_gguf_model_holds_every_type_with_its_figures_and_gate(built):
    project, instance, result = built
    assert result.success
    out = project / "data/lake/gguf_model"
    assert sorted(p.name for p in out.iterdir()) == ["gguf.json", "model-f16.gguf", "model-q4_0.gguf", "model-q8_0.gguf"]
    found, m = json.loads((out / "gguf.json").read_text()), metadata(instance, "gguf_model")
    for t in ("f16", "q8_0", "q4_0"):
        assert m[f"{t}_disk_bytes"] == (out / f"model-{t}.gguf").stat().st_size == found["types"][t]["disk_bytes"]
        assert m[f"{t}_tokens_per_second"] > 0 and m[f"{t}_val_perplexity"] > 1
    assert m["f16_val_perplexity"] == pytest.approx(m["aligned_val_perplexity"], rel=1e-3)
    assert "| q4_0 |" in m["comparison"] and lock_md5(project, "gguf_model") == m["dvc_md5"]
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "gguf_perplexity_within_budget")
    assert check.passed == found["gate"]["passed"] is True and check.blocking
    # what `llm-assets serve --engine llama.cpp` serves for the aligned model (or a quantization of it)
    aligned = project / "data/lake/aligned_checkpoint/merged"
    assert served_gguf(aligned, out, "q8_0") == out / "model-q8_0.gguf"


def test_onnx_model_holds_both_graphs_close_to_pytorch(built):
    project, instance, result = built
    assert result.success
    out = project / "data/lake/onnx_model"
    assert {"model.onnx", "model-int8.onnx", "config.json", "tokenizer.json", "onnx.json"} <= {p.name for p in out.iterdir()}
    m = metadata(instance, "onnx_model")
    assert m["max_abs_logit_diff_fp32"] < 1e-3
    assert m["int8_disk_bytes"] < m["fp32_disk_bytes"] and m["fp32_tokens_per_second"] > 0
    assert m["fp32_val_perplexity"] == pytest.approx(m["aligned_val_perplexity"], rel=1e-4)
    assert lock_md5(project, "onnx_model") == m["dvc_md5"]
