"""base_checkpoint materialized in-process: the trainer runs as a subprocess through Dagster Pipes."""

from pathlib import Path

import dagster as dg
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import UPSTREAM, lock_md5, materialize


@pytest.fixture(scope="module")
def trained(project_factory, tiny_config):
    """One tiny end-to-end run shared by the assertions below (the training is the slow part)."""
    project = project_factory("train")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, tiny_config(), [*UPSTREAM, "base_checkpoint"], instance)
    return project, instance, result


def test_base_checkpoint_metadata_and_files(trained):
    project, instance, result = trained
    assert result.success
    md = instance.get_latest_materialization_event(dg.AssetKey("base_checkpoint")).asset_materialization.metadata
    out = project / "data/lake/base_checkpoint"
    assert Path(md["path"].value) == out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_config.json",
                 "metrics.jsonl", "loss_curve.png"):
        assert (out / name).is_file(), name
    for key in ("train_loss", "val_loss", "val_perplexity", "unigram_perplexity", "tokens_seen",
                "tokens_per_second", "mfu", "parameters", "memory_bytes", "compute_flops", "tokens_per_parameter"):
        assert md[key].value > 0, key
    assert md["perplexity_vs_unigram"].value == pytest.approx(
        md["val_perplexity"].value / md["unigram_perplexity"].value)
    assert md["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
    assert lock_md5(project, "base_checkpoint") == md["dvc_md5"].value
    checks = {e.check_name for e in result.get_asset_check_evaluations()}
    assert "base_checkpoint_beats_unigram" in checks


def test_checkpoint_loads_and_generates(trained):
    project, _, _ = trained
    out = project / "data/lake/base_checkpoint"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("def ", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_config_that_cannot_work_fails_before_training(trained, tiny_config):
    project, instance, _ = trained
    cfg = tiny_config()
    cfg["ops"]["base_checkpoint"]["config"]["seq_len"] = 4096
    result = materialize(project, cfg, ["base_checkpoint"], instance)
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "seq_len" in error and "context" in error


def test_two_process_ddp_through_pipes(trained, tiny_config):
    """nproc_per_node=2: the asset launches torchrun (gloo on CPU) via Pipes; rank 0 reports."""
    project, instance, _ = trained
    cfg = tiny_config(["base_checkpoint"])
    cfg["ops"]["base_checkpoint"]["config"].update({"nproc_per_node": 2, "max_steps": 10, "checkpoint_every": 5})
    result = materialize(project, cfg, ["base_checkpoint"], instance)
    assert result.success
    md = instance.get_latest_materialization_event(dg.AssetKey("base_checkpoint")).asset_materialization.metadata
    assert md["processes"].value == 2 and md["steps"].value == 10
    out = project / "data/lake/base_checkpoint"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("class ", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
