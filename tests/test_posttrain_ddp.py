"""Post-training across processes: lora_checkpoint, reward_model and aligned_checkpoint with
nproc_per_node 2 (torchrun, gloo on CPU, workers/posttrain.py through Pipes) write the artifacts a
one-process run writes. The inputs (a tiny base model, sft_dataset, preference_dataset) are written
directly, so only the three training assets run."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import lock_md5, materialize, metadata
from llm_assets.lib.posttrain import posttrain_data
from llm_assets.lib.posttrain.align import AlignSettings, OnlineData
from llm_assets.lib.posttrain.preferences import PreferencePair
from llm_assets.lib.posttrain.reward import load_reward_model
from llm_assets.workers.posttrain import STAGES, read_request, write_request

ASSETS = ["lora_checkpoint", "reward_model", "aligned_checkpoint"]
CHATS = [[{"role": "user", "content": f"Explain what `mod.f{i}(x)` does."},
          {"role": "assistant", "content": f"Return x plus {i}."}] for i in range(24)]
# Learnable: the chosen reply answers the question, the rejected one never does.
PAIRS = [PreferencePair(f"Explain what `mod.f{i}(x)` does.", f"Return x plus {i}.",
                        f"Open the file number {i} for writing.", f"m.py::f{i}") for i in range(24)]
SCHEDULE = dict(max_len=128, epochs=1.0, max_steps=2, batch_size=4, warmup_ratio=0.0, eval_every=2, log_every=1)
TUNING = dict(tuning_prompts=2, tuning_max_new_tokens=4, repetition_penalties=[1.0], no_repeat_ngram_sizes=[0])


def run_config(nproc: int) -> dict:
    return {"ops": {"lora_checkpoint": {"config": {**SCHEDULE, **TUNING, "eval_examples": 8, "nproc_per_node": nproc}},
                    "reward_model": {"config": {**SCHEDULE, "nproc_per_node": nproc}},
                    "aligned_checkpoint": {"config": {**SCHEDULE, **TUNING, "eval_pairs": 8, "nproc_per_node": nproc}}}}


@pytest.fixture(scope="module")
def inputs(project_factory, tiny_base_dir) -> Path:
    """A project holding what the three assets read: base_checkpoint, sft_dataset, preference_dataset."""
    project = project_factory("ddp")
    lake = project / "data/lake"
    shutil.copytree(tiny_base_dir, lake / "base_checkpoint")
    for name in ("sft_dataset", "preference_dataset"):
        (lake / name).mkdir(parents=True)
    for split, chats, pairs in (("train", CHATS[:16], PAIRS[:16]), ("validation", CHATS[16:], PAIRS[16:])):
        posttrain_data.write_chats(lake / "sft_dataset", split,
                                   [posttrain_data.chat_row(c, f"chats.jsonl#L{i}", "chats.jsonl") for i, c in enumerate(chats)])
        posttrain_data.write_preferences(lake / "preference_dataset", split, pairs)
    return project


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def figures(summary: str) -> list[str]:
    """The first column of a metadata summary table: which figures it shows."""
    return [row.split("|")[1].strip() for row in summary.splitlines()[2:]]


@pytest.fixture(scope="module")
def runs(inputs):
    """{processes: {asset: (metadata, artifact files, the run's 'done' progress events)}}: the three
    assets materialized with one process, then with two."""
    instance = dg.DagsterInstance.ephemeral()
    seen = {}
    for nproc in (1, 2):
        shutil.rmtree(inputs / "data/lake/.work", ignore_errors=True)  # train afresh, not resume the other run
        result = materialize(inputs, run_config(nproc), ASSETS, instance)
        assert result.success
        logs = instance.all_logs(result.run_id)
        seen[nproc] = {a: (metadata(instance, a), files(inputs / f"data/lake/{a}"),
                           [e.user_message for e in logs if e.step_key == a and '"event": "done"' in e.user_message])
                       for a in ASSETS}
    return seen


@pytest.mark.slow
def test_two_processes_write_the_artifacts_one_process_writes(inputs, runs):
    for asset in ASSETS:
        (one, one_files, _), (two, two_files, _) = runs[1][asset], runs[2][asset]
        assert (one["processes"], two["processes"]) == (1, 2)
        assert two_files == one_files, asset  # the same layout: models, adapters, run files
        assert set(two) == set(one), asset  # the same metadata fields ...
        assert figures(two["summary"]) == figures(one["summary"]), asset  # ... and summary rows
        # the same schedule: a step holds batch_size examples however many processes share it
        for key in ("planned_steps", "steps_run", "steps", "best_step", "train_examples", "train_pairs", "eval_pairs"):
            assert two.get(key) == one.get(key), (asset, key)
        assert lock_md5(inputs, asset) == two["dvc_md5"]
    lora, reward, aligned = (runs[2][a][0] for a in ASSETS)
    assert lora["eval_reply_loss_after"] < lora["eval_reply_loss_before"]
    assert 0 <= reward["eval_accuracy"] <= 1 and 0 <= aligned["method_accuracy"] <= 1


@pytest.mark.slow
def test_two_process_artifacts_load_and_rank_0_alone_reports(inputs, runs):
    lake = inputs / "data/lake"
    for asset in ("lora_checkpoint", "aligned_checkpoint"):
        model, tok = AutoModelForCausalLM.from_pretrained(lake / asset / "merged"), AutoTokenizer.from_pretrained(lake / asset / "merged")
        ids = tok("Explain", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    model, _ = load_reward_model(lake / "reward_model")
    assert model.config.num_labels == 1
    for asset in ASSETS:
        done = runs[2][asset][2]
        assert len(done) == 1, asset  # progress came back over Pipes, from rank 0 only
        assert json.loads((lake / asset / "metrics.json").read_text())["best_eval_loss"] == runs[2][asset][0]["best_eval_loss"]
        assert (lake / ".work" / asset / "request.json").is_file()


def test_a_batch_that_does_not_split_over_the_processes_fails_before_they_start(inputs):
    cfg = run_config(2)
    cfg["ops"] = {"lora_checkpoint": cfg["ops"]["lora_checkpoint"]}
    cfg["ops"]["lora_checkpoint"]["config"].update(batch_size=3, nproc_per_node=2)
    result = materialize(inputs, cfg, ["lora_checkpoint"], dg.DagsterInstance.ephemeral())
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "batch_size: 3 examples a step do not split evenly over 2 processes" in error


def test_a_request_gives_the_lib_function_its_arguments_back(tmp_path):
    settings = AlignSettings(objective="grpo", batch_size=4)
    arguments = dict(sft_dir=tmp_path / "lora", train_pairs=PAIRS[:2], eval_pairs=PAIRS[2:3], work_dir=tmp_path / "w",
                     out_dir=tmp_path / "o", compare={"base": tmp_path / "base"},
                     online=OnlineData(CHATS[:2], CHATS[2:3], tmp_path / "reward"))
    write_request(tmp_path / "request.json", "align", settings, **arguments)
    stage, read_settings, read_arguments = read_request(tmp_path / "request.json")
    assert stage is STAGES["align"] and read_settings == settings and read_arguments == arguments
    write_request(tmp_path / "sft.json", "sft", STAGES["sft"].settings(), base_dir=tmp_path, train_chats=CHATS[:1],
                  eval_chats=CHATS[1:2], work_dir=tmp_path, out_dir=tmp_path, sources=(["a"], ["b"]))
    assert read_request(tmp_path / "sft.json")[2]["sources"] == (["a"], ["b"])
    with pytest.raises(ValueError, match="stage: must be one of"):
        write_request(tmp_path / "x.json", "ppo", settings)
