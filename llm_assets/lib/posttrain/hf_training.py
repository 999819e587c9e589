"""What the fine-tuning stages share around a `transformers.Trainer` (TRL's trainers included):
resumable work dirs, progress forwarded to a log callable, and the common arguments.

    run = run_identity({"settings": ..., "data": ...}, [base_dir / "model.safetensors"])
    resume_from = prepare_work_dir(work_dir, run, log)   # None, or the last complete checkpoint
    args = dict(common_arguments(work_dir, settings_seed, bf16_ok), max_steps=..., ...)
    trainer.add_callback(ProgressLog(log))
    trainer.train(resume_from_checkpoint=resume_from)

A killed run resumes from the Trainer's last checkpoint in `work_dir/trainer/` (model or adapter,
optimizer, scheduler, RNG and data position: the Trainer's own format), but only when the run's
identity (settings, examples, base weights) is unchanged: a checkpoint of other settings or data is
deleted, with a log line saying so, and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

Log = Callable[[dict], None]


def run_identity(described: dict, files: Iterable[Path]) -> str:
    """blake2b of a JSON description (settings, the encoded examples) and the bytes of `files`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def prepare_work_dir(work_dir: Path, run_id: str, log: Log) -> str | None:
    """The checkpoint to resume from (None to start fresh); clears checkpoints of another run."""
    work_dir.mkdir(parents=True, exist_ok=True)
    marker, trainer_dir = work_dir / "run_id", work_dir / "trainer"
    found = marker.read_text().strip() if marker.is_file() else None
    if found != run_id:
        if trainer_dir.exists():
            log({"event": "start_over", "message": f"checkpoints in {trainer_dir} belong to another run "
                 f"(settings, data or base changed: {found} != {run_id}); starting over"})
            shutil.rmtree(trainer_dir)
        marker.write_text(run_id)
        return None
    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if last:
        log({"event": "resume", "message": f"resuming from {last}"})
    return last


def validate_schedule(s) -> None:
    """The checks every trainer's settings share (max_len, steps, batch, eval/save/log cadence, lr,
    warmup); raises ValueError naming the field."""
    for name in ("max_len", "max_steps", "batch_size", "eval_every", "save_every", "log_every"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name}: must be at least 1 (got {getattr(s, name)})")
    if s.lr <= 0:
        raise ValueError(f"lr: must be positive (got {s.lr})")
    if not 0 <= s.warmup_steps < s.max_steps:
        raise ValueError(f"warmup_steps: must be in [0, max_steps) (got {s.warmup_steps})")


def write_run_files(out: Path, metrics: dict, config: dict, history: list[dict]) -> None:
    """metrics.json, training_config.json and log_history.jsonl: what every fine-tuning output holds."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    (out / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def bf16_available() -> bool:
    """bf16 only on a GPU that has it: on CPUs without bf16 instructions it is emulated and slow."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def common_arguments(work_dir: Path, seed: int, save_steps: int, logging_steps: int) -> dict:
    """TrainingArguments/DPOConfig keywords every stage uses."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(work_dir / "trainer"),
        seed=seed,
        data_seed=seed,
        bf16=bf16_available(),  # TRL defaults to bf16=True, which fails on CPU
        use_cpu=not cuda,
        gradient_checkpointing=False,  # TRL's default; pointless at this size, and slower
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,  # the latest checkpoint is all a resume needs
        logging_steps=logging_steps,
        report_to="none",  # no wandb/tensorboard: progress goes to Dagster through ProgressLog
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
    )


class ProgressLog(TrainerCallback):
    """Forwards the Trainer's log rows (loss, lr, eval metrics) to `log` and keeps them."""

    def __init__(self, log: Log):
        self.log, self.rows = log, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            self.rows.append(row)
            self.log({"event": "eval" if any(k.startswith("eval_") for k in row) else "train", **row})
