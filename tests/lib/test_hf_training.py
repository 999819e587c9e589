"""What the fine-tuning stages share around a transformers Trainer: run identity, resumable work dirs,
the common arguments, progress forwarding and the run files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

from llm_assets.lib.posttrain.chat_data import PadCollator
from llm_assets.lib.posttrain.hf_training import (ProgressLog, bf16_available, common_arguments, fit,
                                                  prepare_work_dir, run_identity, validate_schedule,
                                                  write_run_files)
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
    ({"eval_every": 0}, "eval_every"), ({"save_every": 0}, "save_every"), ({"log_every": 0}, "log_every"),
    ({"lr": 0.0}, "lr"), ({"warmup_steps": 10}, "warmup_steps"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_schedule_checks_name_the_field(change, field):
    ok = dict(max_len=128, max_steps=10, batch_size=4, eval_every=5, save_every=5, log_every=1, lr=1e-3,
              warmup_steps=2)
    validate_schedule(SimpleNamespace(**ok))
    with pytest.raises(ValueError, match=f"^{field}: "):
        validate_schedule(SimpleNamespace(**{**ok, **change}))


def test_common_arguments_resume_in_the_work_dir_and_report_nowhere(tmp_path):
    args = common_arguments(tmp_path, seed=7, save_steps=5, logging_steps=2)
    assert args["output_dir"] == str(tmp_path / "trainer")
    assert (args["seed"], args["data_seed"], args["save_steps"], args["logging_steps"]) == (7, 7, 5, 2)
    assert args["save_total_limit"] == 1 and args["report_to"] == "none"
    assert args["use_cpu"] == (not torch.cuda.is_available()) and args["bf16"] == bf16_available()
    TrainingArguments(**args)  # every key is a TrainingArguments field


def test_progress_rows_are_forwarded_as_train_or_eval_events():
    events = []
    progress = ProgressLog(events.append)
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
