"""Resumable training checkpoints: atomic, self-checking, loadable without unpickling code.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from llm_assets.lib.pretrain.checkpoints import latest_checkpoint, resume, run_hash, save_checkpoint
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.tokenizer.packing import write_streams
    >>> tokens_dir, work_dir = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> meta = write_streams(tokens_dir, {"train": [5, 6, 1], "validation": [7, 1]}, vocab_size=64,
    ...                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    >>> def training_state():
    ...     model = build_model("tiny", vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    ...     optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ...     return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    >>> model, optimizer, scheduler = training_state()
    >>> run_id = run_hash({"lr": 1e-3}, meta, tokens_dir, world=1)   # settings that matter + data
    >>> state = {"step": 120, "run_hash": run_id, "tokens_seen": 7680, "history": [{"step": 120, "train_loss": 3.2}]}
    >>> save_checkpoint(work_dir, model, optimizer, scheduler, state) == latest_checkpoint(work_dir)
    True
    >>> sorted(p.name for p in latest_checkpoint(work_dir).iterdir())
    ['config.json', 'model.safetensors', 'optimizer.pt', 'state.json']
    >>> fresh, optimizer, scheduler = training_state()      # what a restarted process builds
    >>> resume(work_dir, run_id, 0, 1, "cpu", fresh, optimizer, scheduler, emit=lambda e: print(e["event"]))
    resume
    (120, [{'step': 120, 'train_loss': 3.2}], 7680)
    >>> torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    True
    >>> resume(work_dir, "other settings", 0, 1, "cpu", fresh, optimizer, scheduler, emit=lambda e: print(e["event"]))
    start_over
    (0, [], 0)

`work_dir/checkpoint-00000120/` holds the state after 120 steps: `model.safetensors`,
`config.json`, `optimizer.pt` (optimizer, scheduler and torch RNG state: tensors, numbers and lists
only, loaded with `weights_only=True`) and `state.json` (step, tokens seen, run hash, metric
history). It is written through a staging dir + rename and older checkpoints are deleted, so the
latest complete one is always there. A checkpoint is resumed only by a run with the same hash:
other settings or data start over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from llm_assets.lib.common.atomic import STAGING_PREFIX, atomic_dir
from llm_assets.lib.tokenizer.packing import split_path

CHECKPOINT_PREFIX = "checkpoint-"  # work_dir/checkpoint-00000120/ = state after 120 steps


def run_hash(settings: dict, meta: dict, tokens_dir: Path, world: int) -> str:
    """Identity of what a run computes: the settings that matter, the world size (it decides the
    batches), the data meta and the bytes of both splits (blake2b, ~1 s per GB)."""
    h = hashlib.blake2b(digest_size=16)
    described = {"settings": settings, "world": world, "meta": meta}
    h.update(json.dumps(described, sort_keys=True).encode())
    for split in ("train", "validation"):
        with open(split_path(tokens_dir, split), "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def latest_checkpoint(work_dir: Path) -> Path | None:
    done = [p for p in work_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def save_checkpoint(work_dir: Path, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoint-<step>/ through a staging dir + rename, then delete every older one."""
    target = work_dir / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # stores the tied embedding once
        model.config.to_json_file(tmp / "config.json")
        # Tensors, numbers and lists only: loads back with weights_only=True. No RNG draws happen
        # in training (no dropout; batches come from the seed), the torch state is kept anyway.
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))  # step, tokens, hash, metric history
    for old in work_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != target:
            shutil.rmtree(old)
    return target


def resume(work_dir: Path, run_id: str, rank: int, world: int, device, model, optimizer,
           scheduler, emit) -> tuple[int, list[dict], int]:
    """(step, history, tokens_seen) of the latest checkpoint written by this exact run, loaded into
    model/optimizer/scheduler; (0, [], 0) when there is none. Rank 0 decides and says why (a
    checkpoint of other settings or data is never resumed); every rank loads the same one."""
    step = 0
    if rank == 0:
        for stale in work_dir.glob(f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}*"):  # a write cut by a kill
            shutil.rmtree(stale)
        ckpt = latest_checkpoint(work_dir)
        found = json.loads((ckpt / "state.json").read_text())["run_hash"] if ckpt else run_id
        if found != run_id:
            emit({"event": "start_over", "checkpoint": str(ckpt), "message": f"{ckpt.name} was "
                  f"written for other settings or data ({found} != {run_id}); starting over"})
        elif ckpt:
            step = int(ckpt.name.removeprefix(CHECKPOINT_PREFIX))
    if world > 1:  # every rank must run the same steps
        agreed = torch.tensor([step], device=device)
        dist.broadcast(agreed, src=0)
        step = int(agreed.item())
    if step == 0:
        return 0, [], 0
    ckpt = work_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    load_model(model, str(ckpt / "model.safetensors"), device=str(device))
    saved = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"].cpu())
    state = json.loads((ckpt / "state.json").read_text())
    emit({"event": "resume", "step": step, "message": f"resumed from step {step} ({ckpt})"})
    return step, state["history"], state["tokens_seen"]
