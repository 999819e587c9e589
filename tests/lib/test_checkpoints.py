"""Pretraining checkpoints: what a run's identity covers, what a checkpoint holds, what resume restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_assets.lib.common.atomic import STAGING_PREFIX
from llm_assets.lib.pretrain.checkpoints import latest_checkpoint, resume, run_hash, save_checkpoint
from llm_assets.lib.pretrain.model import build_model
from llm_assets.lib.tokenizer.packing import write_streams

VOCAB = 64


def tokens(tmp_path: Path, train=(5, 6, 1, 7, 1)) -> tuple[Path, dict]:
    out = tmp_path / "tokens"
    meta = write_streams(out, {"train": list(train), "validation": [8, 1]}, VOCAB, 0, 1, 2)
    return out, meta


def training_state(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny", VOCAB, 0, 1, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def take_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        loss = model(input_ids=torch.tensor([[0, 5, 6, 7]]), labels=torch.tensor([[0, 5, 6, 7]])).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def state(step: int, run_id: str) -> dict:
    return {"step": step, "run_hash": run_id, "tokens_seen": 64 * step, "history": [{"step": step, "train_loss": 3.0}]}


def test_run_hash_covers_settings_world_meta_and_token_bytes(tmp_path):
    tokens_dir, meta = tokens(tmp_path)
    same = run_hash({"lr": 1e-3}, meta, tokens_dir, world=1)
    assert same == run_hash({"lr": 1e-3}, dict(meta), tokens_dir, world=1)
    assert len(same) == 32 and int(same, 16) >= 0
    other_bytes, other_meta = tokens(tmp_path / "b", train=(5, 6, 1, 9, 1))  # same length, other ids
    assert other_meta == meta
    assert len({same, run_hash({"lr": 2e-3}, meta, tokens_dir, 1), run_hash({"lr": 1e-3}, meta, tokens_dir, 2),
                run_hash({"lr": 1e-3}, {**meta, "vocab_size": 65}, tokens_dir, 1),
                run_hash({"lr": 1e-3}, meta, other_bytes, 1)}) == 5


def test_a_checkpoint_holds_weights_config_optimizer_and_state_and_replaces_the_last(tmp_path):
    work = tmp_path / "work"
    model, optimizer, scheduler = training_state()
    take_steps(model, optimizer, scheduler, 2)
    first = save_checkpoint(work, model, optimizer, scheduler, state(2, "r"))
    assert first.name == "checkpoint-00000002"
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors", "optimizer.pt", "state.json"]
    assert json.loads((first / "state.json").read_text()) == state(2, "r")
    torch.load(first / "optimizer.pt", weights_only=True)  # tensors, numbers and lists only: no pickled code
    second = save_checkpoint(work, model, optimizer, scheduler, state(10, "r"))
    assert latest_checkpoint(work) == second and not first.exists()
    assert [p.name for p in work.iterdir()] == [second.name]  # no staging or older dirs left


def test_latest_checkpoint_skips_a_directory_without_state(tmp_path):
    work = tmp_path / "work"
    assert latest_checkpoint(work) is None
    model, optimizer, scheduler = training_state()
    done = save_checkpoint(work, model, optimizer, scheduler, state(4, "r"))
    (work / "checkpoint-00000009").mkdir()  # e.g. copied by hand, half way
    assert latest_checkpoint(work) == done


def test_resume_restores_weights_optimizer_scheduler_and_history(tmp_path):
    work = tmp_path / "work"
    model, optimizer, scheduler = training_state(seed=0)
    take_steps(model, optimizer, scheduler, 3)
    save_checkpoint(work, model, optimizer, scheduler, state(3, "run"))
    (work / f"{STAGING_PREFIX}checkpoint-00000004-abc").mkdir()  # a write cut short by a kill
    events = []
    fresh, fresh_opt, fresh_sched = training_state(seed=1)
    assert resume(work, "run", 0, 1, "cpu", fresh, fresh_opt, fresh_sched, events.append) == (
        3, [{"step": 3, "train_loss": 3.0}], 192)
    assert [e["event"] for e in events] == ["resume"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in work.iterdir())
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_sched.last_epoch == scheduler.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    # the next step from the restored state is the step the uninterrupted run takes
    take_steps(model, optimizer, scheduler, 1)
    take_steps(fresh, fresh_opt, fresh_sched, 1)
    assert torch.allclose(model.model.norm.weight, fresh.model.norm.weight)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    work = tmp_path / "work"
    model, optimizer, scheduler = training_state(seed=0)
    save_checkpoint(work, model, optimizer, scheduler, state(5, "old settings"))
    events = []
    fresh, fresh_opt, fresh_sched = training_state(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert resume(work, "new settings", 0, 1, "cpu", fresh, fresh_opt, fresh_sched, events.append) == (0, [], 0)
    assert [e["event"] for e in events] == ["start_over"] and "other settings or data" in events[0]["message"]
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
