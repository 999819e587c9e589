"""What the fine-tuning stages share around a `transformers.Trainer` (TRL's trainers included):
resumable work dirs, progress forwarded to a log callable, and the common arguments.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from transformers import Trainer, TrainingArguments
    >>> from llm_assets.lib.posttrain.chat_data import PadCollator
    >>> from llm_assets.lib.posttrain.hf_training import common_arguments, fit, prepare_work_dir, run_identity
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> work_dir = Path(tempfile.mkdtemp())
    >>> examples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}] * 8
    >>> run = run_identity({"settings": {"lr": 1e-3}, "examples": examples}, files=[])  # + the base's weights
    >>> events = []
    >>> resume_from = prepare_work_dir(work_dir, run, events.append)   # None, or the last complete checkpoint
    >>> args = TrainingArguments(**common_arguments(work_dir, seed=0, save_steps=2, logging_steps=1),
    ...                          max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3)
    >>> trainer = Trainer(model=build_model("tiny", 64, 0, 1, 2), args=args, train_dataset=examples,
    ...                   data_collator=PadCollator(pad_id=2))
    >>> trained, seconds, curve = fit(trainer, resume_from, events.append)
    >>> trained.global_step, [row["step"] for row in curve], [e["event"] for e in events]
    (2, [1, 2], ['train', 'train', 'train'])
    >>> prepare_work_dir(work_dir, run, events.append).endswith("trainer/checkpoint-2"), events[-1]["event"]
    (True, 'resume')
    >>> prepare_work_dir(work_dir, "another run", events.append), events[-1]["event"]
    (None, 'start_over')

A killed run resumes from the Trainer's last checkpoint in `work_dir/trainer/` (model or adapter,
optimizer, scheduler, RNG and data position: the Trainer's own format), but only when the run's
identity (settings, examples, base weights) is unchanged: a checkpoint of other settings or data is
deleted, with a log line saying so, and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
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


def fit(trainer, resume_from: str | None, log: Log) -> tuple:
    """Train with ProgressLog instead of the console printer: (the Trainer's TrainOutput, seconds in
    `train()`, the log rows that hold a training "loss" or an "eval_loss": the loss curve)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressLog reports the same rows
    trainer.add_callback(ProgressLog(log))
    start = time.perf_counter()
    trained = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    return trained, seconds, [r for r in trainer.state.log_history if "loss" in r or "eval_loss" in r]
