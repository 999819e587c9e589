"""What the fine-tuning stages share around a `transformers.Trainer` (TRL's trainers included): one
schedule definition (epochs with a step cap, best-checkpoint selection, early stopping), resumable
work dirs, progress forwarded to a log callable, and the run files.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from transformers import Trainer, TrainingArguments
    >>> from llm_assets.lib.posttrain.chat_data import PadCollator
    >>> from llm_assets.lib.posttrain.hf_training import (ScheduleSettings, fit, planned_steps, prepare_work_dir,
    ...                                                   run_identity, schedule_callbacks, selection_summary,
    ...                                                   trainer_arguments)
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> work_dir = Path(tempfile.mkdtemp())
    >>> examples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}] * 8
    >>> s = ScheduleSettings(epochs=1.0, max_steps=100, batch_size=4, lr=1e-2, eval_every=1, log_every=1,
    ...                      precision="fp32")
    >>> planned_steps(s, len(examples))                  # min(max_steps, ceil(epochs * 8 / 4))
    2
    >>> run = run_identity({"settings": s.model_dump(), "examples": examples}, files=[])  # + the base's weights
    >>> events = []
    >>> resume_from = prepare_work_dir(work_dir, run, events.append)   # None, or the last complete checkpoint
    >>> args = TrainingArguments(**trainer_arguments(s, work_dir, len(examples)))
    >>> trainer = Trainer(model=build_model("tiny", 64, 0, 1, 2), args=args, train_dataset=examples,
    ...                   eval_dataset=examples[:4], data_collator=PadCollator(pad_id=2),
    ...                   callbacks=schedule_callbacks(s))
    >>> trained, seconds, curve = fit(trainer, resume_from, events.append)
    >>> trained.global_step, [row["step"] for row in curve], [e["event"] for e in events]
    (2, [1, 1, 2, 2], ['train', 'eval', 'train', 'eval', 'train'])
    >>> summary = selection_summary(curve, planned_steps(s, len(examples)))
    >>> summary["best_step"], summary["steps_run"], summary["stopped_early"]  # the Trainer kept the best
    (2, 2, False)
    >>> prepare_work_dir(work_dir, run, events.append).endswith("trainer/checkpoint-2"), events[-1]["event"]
    (True, 'resume')
    >>> prepare_work_dir(work_dir, "another run", events.append), events[-1]["event"]
    (None, 'start_over')

The schedule is sized in epochs, passes over the training examples, with `max_steps` as a cap: a
small preference set gets several passes, a large instruction set as many steps as the time allows.
The learning rate warms up over `warmup_ratio` of the planned steps, then decays (cosine) to 0.
Every `eval_every` steps the held-out loss is measured and a checkpoint saved (transformers wants
save steps to be a multiple of eval steps to select the best model); at the end the Trainer loads
the checkpoint of the lowest held-out loss (`load_best_model_at_end`), so what a stage saves is the
best model, not the last. With `patience` > 0, transformers' `EarlyStoppingCallback` stops a run
after that many evaluations without an improvement.

A killed run resumes from the Trainer's last checkpoint in `work_dir/trainer/` (model or adapter,
optimizer, scheduler, RNG, data position and the best-so-far: the Trainer's own format), but only
when the run's identity (settings, examples, base weights) is unchanged: a checkpoint of other
settings or data is deleted, with a log line saying so, and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import Field

from llm_assets.lib.common.memory import kept_freed_memory
from llm_assets.lib.common.precision import PRECISIONS, autocast_dtype
from llm_assets.lib.common.settings import Settings

Log = Callable[[dict], None]


class ScheduleSettings(Settings):
    """The schedule every Trainer here shares (SFT, DPO and the other preference methods, reward
    models): each field defined once; a stage inherits it and may give a field another default."""

    max_len: int = Field(256, description="Tokens per example, prompt and reply. A longer example is truncated, "
                                          "not dropped: the prompt loses its oldest turns, then its start; the "
                                          "reply keeps at least half and is cut at its end (truncated_to_fit, "
                                          "too_long_examples in metadata).")
    epochs: float = Field(1.0, description="Passes over the training examples (fractions allowed); max_steps caps them.")
    max_steps: int = Field(200, description="A cap on optimizer steps: steps = min(max_steps, "
                                            "ceil(epochs x training examples / batch_size)).")
    batch_size: int = Field(16, description="Examples (or preference pairs) per optimizer step, split evenly over "
                                            "the training processes (nproc_per_node): more processes, same schedule.")
    lr: float = Field(1e-3, description="Peak AdamW learning rate, linear warmup then cosine decay to 0 "
                                        "(adapters take far higher rates than full fine-tuning).")
    warmup_ratio: float = Field(0.05, description="Share of the planned steps spent in linear warmup, in [0, 1).")
    weight_decay: float = Field(0.0, description="The Trainer's AdamW decoupled weight decay (0 = none).")
    eval_every: int = Field(40, description="Steps between held-out evaluations (the loss curve's points); each "
                                            "also saves a resumable checkpoint, a candidate for the best model.")
    patience: int = Field(0, description="Evaluations without a held-out improvement before training stops early "
                                         "(0 = never stop early); the best checkpoint is kept either way.")
    log_every: int = Field(10, description="Steps between the Trainer's training-loss log rows.")
    seed: int = Field(0, description="Seeds the adapter's initialization and the data order.")
    precision: str = Field("fp32", description="fp32 | bf16 | auto (bf16 autocast where the device computes bf16 "
                                               "natively; weights and optimizer stay fp32). fp32 by default (the "
                                               "tiny test models); the demo sets auto: a demo-size LoRA step took "
                                               "0.177 s in bf16 vs 0.239 s in fp32 on an AVX512-BF16 CPU.")


def schedule_field(name: str, default):
    """`ScheduleSettings`'s field `name` with another default, its description unchanged: how a
    stage sizes its own schedule without writing the description a second time."""
    return Field(default, description=ScheduleSettings.model_fields[name].description)


def validate_schedule(s) -> None:
    """The checks every trainer's schedule shares; raises ValueError naming the field."""
    for name in ("max_len", "max_steps", "batch_size", "eval_every", "log_every"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name}: must be at least 1 (got {getattr(s, name)})")
    for name in ("epochs", "lr"):
        if not getattr(s, name) > 0:
            raise ValueError(f"{name}: must be positive (got {getattr(s, name)})")
    if not 0 <= s.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio: must be in [0, 1) (got {s.warmup_ratio})")
    if s.weight_decay < 0:
        raise ValueError(f"weight_decay: must not be negative (got {s.weight_decay})")
    if s.patience < 0:
        raise ValueError(f"patience: must not be negative (got {s.patience})")
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS} (got {s.precision!r})")


def planned_steps(s: ScheduleSettings, n_train: int) -> int:
    """min(max_steps, ceil(epochs * n_train / batch_size)): the steps the schedule plans for."""
    # round() first: 3.0 * 640 / 8 must give 240, not 241 from a float a hair above it
    return max(1, min(s.max_steps, math.ceil(round(s.epochs * n_train / s.batch_size, 6))))


def world_size() -> int:
    """Training processes: the process group's size, or torchrun's WORLD_SIZE before the Trainer
    creates the group (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes the run's files and logs."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def wait_for_all() -> None:
    """A barrier across the training processes (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def per_device_batch(batch_size: int, world: int | None = None) -> int:
    """batch_size split over the `world` processes (default: world_size()): every process takes an
    equal share of each step, so a step holds batch_size examples however many processes train (the
    schedule does not change)."""
    world = world or world_size()
    if batch_size % world:
        raise ValueError(f"batch_size: {batch_size} examples a step do not split evenly over {world} processes "
                         "(nproc_per_node)")
    return batch_size // world


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def uses_bf16(precision: str) -> bool:
    """Whether a `precision` setting means bf16 autocast on this machine (lib/common/precision.py)."""
    return autocast_dtype(precision, training_device()) == torch.bfloat16


def common_arguments(work_dir: Path, seed: int, save_steps: int, logging_steps: int, precision: str = "fp32") -> dict:
    """TrainingArguments/DPOConfig keywords every stage uses (trainer_arguments adds the schedule)."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(work_dir / "trainer"),
        seed=seed,
        data_seed=seed,
        bf16=uses_bf16(precision),  # explicit: TRL defaults to bf16=True, which fails on a CPU without use_cpu
        use_cpu=not cuda,
        gradient_checkpointing=False,  # TRL's default; pointless at this size, and slower
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,  # the best checkpoint (the result) and the latest (for a resume)
        logging_steps=logging_steps,
        report_to="none",  # no wandb/tensorboard: progress goes to Dagster through progress_log
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        # DDP: every trainable parameter takes part in each step; transformers would otherwise search
        # a PEFT model for unused ones, an extra pass over the graph every step
        ddp_find_unused_parameters=False,
    )


def trainer_arguments(s: ScheduleSettings, work_dir: Path, n_train: int) -> dict:
    """common_arguments plus the schedule: planned steps, warmup and cosine decay, a held-out
    evaluation and a checkpoint every eval_every steps, the lowest eval_loss loaded at the end."""
    steps = planned_steps(s, n_train)
    return dict(
        **common_arguments(work_dir, s.seed, s.eval_every, s.log_every, s.precision),
        max_steps=steps,
        per_device_train_batch_size=per_device_batch(s.batch_size),
        per_device_eval_batch_size=per_device_batch(s.batch_size),
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=round(s.warmup_ratio * steps),  # an int: transformers reads a float < 1 as a ratio
        weight_decay=s.weight_decay,
        eval_strategy="steps",
        eval_steps=s.eval_every,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )


def schedule_callbacks(s: ScheduleSettings) -> list:
    """transformers' EarlyStoppingCallback when patience > 0 (it needs trainer_arguments' best-model
    tracking), else nothing."""
    from transformers import EarlyStoppingCallback  # not at import: see progress_log

    return [EarlyStoppingCallback(early_stopping_patience=s.patience)] if s.patience > 0 else []


def _mean(rows: list[dict], key: str, after: int, upto: int) -> float:
    """Mean `key` of the log rows with after < step <= upto (NaN when there are none)."""
    values = [r[key] for r in rows if key in r and after < r["step"] <= upto]
    return sum(values) / len(values) if values else math.nan


def selection_summary(history: list[dict], planned: int, metric: str = "eval_loss", higher: bool = False,
                      train_metric: str = "loss") -> dict:
    """What best-checkpoint selection found in a curve (fit's rows), `planned` the planned steps:
    best_step and best_eval_loss (the best held-out `metric`, lowest unless `higher`: the model
    kept; named for the usual metric, the held-out loss), last_eval_loss, steps_run, stopped_early,
    and overfitting_from_step: the best step when, after it, the held-out metric got worse while the
    training one (`train_metric`, the same direction) kept improving (its mean between the best and
    the next evaluation better than over the stretch before the best); -1 when it never did."""
    evals = [r for r in history if metric in r]
    if not evals:
        raise ValueError(f"history: no {metric} row; the schedule evaluates every eval_every steps")
    sign = -1 if higher else 1  # compare as losses
    best = min(evals, key=lambda r: sign * r[metric])  # the first of equals, as the Trainer keeps it
    steps_run = max(r["step"] for r in history)
    overfitting = -1
    after = [r for r in evals if r["step"] > best["step"]]
    if after and sign * after[0][metric] > sign * best[metric]:
        before = max((r["step"] for r in evals if r["step"] < best["step"]), default=0)
        if sign * _mean(history, train_metric, best["step"], after[0]["step"]) < \
                sign * _mean(history, train_metric, before, best["step"]):
            overfitting = best["step"]
    return {"best_step": best["step"], "best_eval_loss": best[metric], "last_eval_loss": evals[-1][metric],
            "steps_run": steps_run, "stopped_early": steps_run < planned, "overfitting_from_step": overfitting}


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
    """The checkpoint to resume from (None to start fresh); clears checkpoints of another run.
    Under DDP rank 0 alone clears, and every rank then finds the same checkpoint (or none)."""
    marker, trainer_dir = work_dir / "run_id", work_dir / "trainer"
    if is_main_process():
        work_dir.mkdir(parents=True, exist_ok=True)
        found = marker.read_text().strip() if marker.is_file() else None
        if found != run_id:
            if trainer_dir.exists():
                log({"event": "start_over", "message": f"checkpoints in {trainer_dir} belong to another run "
                     f"(settings, data or base changed: {found} != {run_id}); starting over"})
                shutil.rmtree(trainer_dir)
            marker.write_text(run_id)
    wait_for_all()
    from transformers.trainer_utils import get_last_checkpoint  # not at import: see progress_log

    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if last:
        log({"event": "resume", "message": f"resuming from {last}"})
    return last


def write_run_files(out: Path, metrics: dict, config: dict, history: list[dict]) -> None:
    """metrics.json, training_config.json and log_history.jsonl: what every fine-tuning output holds."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    (out / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def read_run_files(out: Path) -> tuple[dict, list[dict]]:
    """(metrics, history) as write_run_files wrote them: how a stage trained in other processes
    (workers/posttrain.py) gives its result back."""
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), history


def progress_log(log: Log):
    """A TrainerCallback that forwards the Trainer's log rows (loss, lr, eval metrics) to `log` and
    keeps them in `.rows`. Its class is made here, not at import: transformers' callback module
    imports its trainer utilities and peft (4 s), which every `llm-assets` command paid on loading
    the definitions, training or not."""
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        def __init__(self):
            self.rows = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                self.rows.append(row)
                log({"event": "eval" if any(k.startswith("eval_") for k in row) else "train", **row})

    return ProgressLog()


def fit(trainer, resume_from: str | None, log: Log) -> tuple:
    """Train with progress_log instead of the console printer: (the Trainer's TrainOutput, seconds in
    `train()`, the log rows that hold a training "loss" or a held-out figure: the curve). With
    trainer_arguments the trainer's model is the best checkpoint's afterwards."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress_log reports the same rows
    trainer.add_callback(progress_log(log))
    start = time.perf_counter()
    with kept_freed_memory():  # each step reallocates its activations: reuse them, do not page-fault
        trained = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    return trained, seconds, [r for r in trainer.state.log_history if {"loss", "eval_loss", "eval_reward"} & set(r)]
