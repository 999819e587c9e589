"""What the fine-tuning stages share around a transformers Trainer: the schedule (steps from epochs,
best-checkpoint selection, early stopping), run identity, resumable work dirs, the common arguments,
progress forwarding and the run files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

from llm_assets.lib.posttrain.chat_data import PadCollator
from llm_assets.lib.posttrain.hf_training import (ScheduleSettings, common_arguments, fit, progress_log,
                                                  is_main_process, per_device_batch, planned_steps,
                                                  prepare_work_dir, read_run_files, run_identity,
                                                  schedule_callbacks, selection_summary, trainer_arguments,
                                                  uses_bf16, validate_schedule, world_size, write_run_files)
from llm_assets.lib.pretrain.model import build_model

EXAMPLES = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]}] * 8


def test_run_identity_covers_the_description_and_the_file_bytes(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"base weights v1")
    one = run_identity({"settings": {"lr": 1e-3}, "examples": EXAMPLES}, [weights])
    assert one == run_identity({"examples": EXAMPLES, "settings": {"lr": 1e-3}}, [weights])  # key order
    others = {run_identity({"settings": {"lr": 2e-3}, "examples": EXAMPLES}, [weights]),
              run_identity({"settings": {"lr": 1e-3}, "examples": EXAMPLES[:4]}, [weights])}
    weights.write_bytes(b"base weights v2")
    others.add(run_identity({"settings": {"lr": 1e-3}, "examples": EXAMPLES}, [weights]))
    assert one not in others and len(others) == 3


def test_a_work_dir_resumes_only_its_own_run(tmp_path):
    work, events = tmp_path / "work", []
    assert prepare_work_dir(work, "run-a", events.append) is None and events == []  # fresh
    (work / "trainer" / "checkpoint-4").mkdir(parents=True)
    (work / "trainer" / "checkpoint-8").mkdir()
    assert prepare_work_dir(work, "run-a", events.append) == str(work / "trainer" / "checkpoint-8")
    assert events[-1]["event"] == "resume"
    assert prepare_work_dir(work, "run-b", events.append) is None
    assert events[-1]["event"] == "start_over" and "run-a != run-b" in events[-1]["message"]
    assert not (work / "trainer").exists() and (work / "run_id").read_text() == "run-b"


@pytest.mark.parametrize("change, field", [
    ({"max_len": 0}, "max_len"), ({"max_steps": 0}, "max_steps"), ({"batch_size": 0}, "batch_size"),
    ({"eval_every": 0}, "eval_every"), ({"log_every": 0}, "log_every"), ({"epochs": 0.0}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"warmup_ratio": -0.1}, "warmup_ratio"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"patience": -1}, "patience"), ({"precision": "fp16"}, "precision"),
])
def test_schedule_checks_name_the_field(change, field):
    validate_schedule(ScheduleSettings())
    with pytest.raises(ValueError, match=f"^{field}: "):
        validate_schedule(ScheduleSettings(**change))


@pytest.mark.parametrize("epochs, max_steps, n_train, batch, steps", [
    (1.0, 1000, 100, 16, 7),    # a last, smaller batch counts as a step
    (3.0, 1000, 640, 8, 240),   # exact: no extra step from float rounding
    (0.5, 1000, 7500, 16, 235),
    (1.0, 200, 7500, 16, 200),  # the cap
    (0.01, 1000, 10, 16, 1),    # at least one
])
def test_planned_steps_are_epochs_capped_by_max_steps(epochs, max_steps, n_train, batch, steps):
    assert planned_steps(ScheduleSettings(epochs=epochs, max_steps=max_steps, batch_size=batch), n_train) == steps


def test_trainer_arguments_plan_the_schedule_and_keep_the_best(tmp_path):
    s = ScheduleSettings(epochs=2.0, max_steps=1000, batch_size=4, warmup_ratio=0.1, eval_every=5, precision="fp32")
    args = trainer_arguments(s, tmp_path, n_train=100)
    assert args["max_steps"] == 50 and args["warmup_steps"] == 5 and args["lr_scheduler_type"] == "cosine"
    assert args["eval_steps"] == args["save_steps"] == 5  # every evaluation is a checkpoint to pick
    assert (args["load_best_model_at_end"], args["metric_for_best_model"], args["greater_is_better"]) == (
        True, "eval_loss", False)
    assert args["bf16"] is False
    TrainingArguments(**args)  # a valid combination (best-model loading checks save vs eval steps)
    assert trainer_arguments(s.model_copy(update={"precision": "bf16"}), tmp_path, 100)["bf16"] is True
    assert schedule_callbacks(s) == []
    [stopper] = schedule_callbacks(s.model_copy(update={"patience": 3}))
    assert type(stopper).__name__ == "EarlyStoppingCallback" and stopper.early_stopping_patience == 3


def curve(train: list[tuple[int, float]], held: list[tuple[int, float]]) -> list[dict]:
    return sorted([{"step": s, "loss": v} for s, v in train] + [{"step": s, "eval_loss": v} for s, v in held],
                  key=lambda r: r["step"])


def test_selection_summary_finds_the_best_step_and_where_overfitting_began():
    train = [(s, 3.0 - 0.1 * s) for s in range(1, 21)]  # training loss falls throughout
    overfit = selection_summary(curve(train, [(5, 2.5), (10, 2.2), (15, 2.4), (20, 2.6)]), planned=20)
    assert overfit == {"best_step": 10, "best_eval_loss": 2.2, "last_eval_loss": 2.6, "steps_run": 20,
                       "stopped_early": False, "overfitting_from_step": 10}
    improving = selection_summary(curve(train, [(5, 2.5), (10, 2.2), (15, 2.1), (20, 2.0)]), planned=40)
    assert (improving["best_step"], improving["overfitting_from_step"], improving["stopped_early"]) == (20, -1, True)
    # held-out loss rose, but so did the training loss: a bad step (lr too high), not overfitting
    unstable = [(s, 3.0 - 0.1 * s if s <= 10 else 5.0) for s in range(1, 21)]
    assert selection_summary(curve(unstable, [(5, 2.5), (10, 2.2), (15, 2.9), (20, 3.0)]), 20)["overfitting_from_step"] == -1
    with pytest.raises(ValueError, match="eval_loss"):
        selection_summary(curve(train, []), 20)


def test_common_arguments_resume_in_the_work_dir_and_report_nowhere(tmp_path):
    args = common_arguments(tmp_path, seed=7, save_steps=5, logging_steps=2)
    assert args["output_dir"] == str(tmp_path / "trainer")
    assert (args["seed"], args["data_seed"], args["save_steps"], args["logging_steps"]) == (7, 7, 5, 2)
    assert args["save_total_limit"] == 2 and args["report_to"] == "none"
    assert args["use_cpu"] == (not torch.cuda.is_available()) and args["bf16"] is False  # fp32 unless asked
    assert common_arguments(tmp_path, 7, 5, 2, precision="auto")["bf16"] == uses_bf16("auto")
    TrainingArguments(**args)  # every key is a TrainingArguments field


def test_progress_rows_are_forwarded_as_train_or_eval_events():
    events = []
    progress = progress_log(events.append)
    state = SimpleNamespace(global_step=3)
    progress.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-3, "note": "text"})
    progress.on_log(None, state, None, logs={"eval_loss": 2.1})
    progress.on_log(None, state, None, logs={})
    assert events == [{"event": "train", "step": 3, "loss": 2.5, "learning_rate": 1e-3},
                      {"event": "eval", "step": 3, "eval_loss": 2.1}]
    assert progress.rows == [{k: v for k, v in e.items() if k != "event"} for e in events]


def test_fit_trains_logs_through_the_callback_and_checkpoints_for_a_resume(tmp_path):
    work, events = tmp_path / "work", []
    torch.manual_seed(0)
    args = TrainingArguments(**common_arguments(work, seed=0, save_steps=2, logging_steps=1), max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2)
    trainer = Trainer(model=build_model("tiny", 64, 0, 1, 2), args=args, train_dataset=EXAMPLES,
                      data_collator=PadCollator(2))
    trained, seconds, curve = fit(trainer, None, events.append)
    assert trained.global_step == 2 and seconds > 0
    assert [r["step"] for r in curve] == [1, 2] and curve[1]["loss"] < curve[0]["loss"]
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    assert (work / "trainer" / "checkpoint-2").is_dir()


def test_run_files(tmp_path):
    write_run_files(tmp_path, {"eval_loss": 1.5}, {"lr": 1e-3, "path": tmp_path}, [{"step": 1}, {"step": 2}])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"eval_loss": 1.5}
    assert json.loads((tmp_path / "training_config.json").read_text()) == {"lr": 1e-3, "path": str(tmp_path)}
    lines = (tmp_path / "log_history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1}, {"step": 2}]
    assert read_run_files(tmp_path) == ({"eval_loss": 1.5}, [{"step": 1}, {"step": 2}])


def test_a_step_keeps_batch_size_examples_split_over_the_processes(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE, RANK) each process takes its share of a step; rank 0 is the main one."""
    assert (world_size(), is_main_process(), per_device_batch(16)) == (1, True, 16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (world_size(), is_main_process(), per_device_batch(16)) == (2, False, 8)
    args = trainer_arguments(ScheduleSettings(batch_size=8, max_steps=10), tmp_path, n_train=40)
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 4
    assert args["max_steps"] == planned_steps(ScheduleSettings(batch_size=8, max_steps=10), 40) == 5  # unchanged
    with pytest.raises(ValueError, match="^batch_size: 7 examples a step do not split evenly over 2 processes"):
        per_device_batch(7)
    assert per_device_batch(12, world=3) == 4
