"""Supervised instruction tuning of the base model with a PEFT adapter (LoRA, QLoRA or IA3).

    result = train_sft(settings, base_dir, train_chats, eval_chats, work_dir, out_dir, log=print)
    result["metrics"]["eval_reply_loss_before"], result["metrics"]["eval_reply_loss_after"]

Chats are lists of {role, content} messages ending in the assistant reply to learn. They are
encoded with the base's chat template (see chat_data.py: loss on the reply only) and trained with a
plain `transformers.Trainer` on the adapter's parameters; the base stays frozen. A killed run
resumes from its last Trainer checkpoint (hf_training.py).

`out_dir` gets:
- `adapter/`: the PEFT adapter (adapter_config.json, adapter_model.safetensors);
- `merged/`: the adapter merged into an fp32 copy of the base, with the tokenizer: loads with
  `AutoModelForCausalLM.from_pretrained` and needs no PEFT; its generation config stops at `<|end|>`;
- `metrics.json`, `training_config.json`, `log_history.jsonl`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm_assets.lib.posttrain import adapters, hf_training
from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.posttrain.chat_data import PadCollator, encode_chat, end_token_id, reply_loss


@dataclass
class SftSettings:
    adapter: adapters.AdapterSettings = field(default_factory=adapters.AdapterSettings)
    max_len: int = 256  # tokens per example (prompt + reply); longer examples are dropped, counted
    max_steps: int = 160  # optimizer steps
    batch_size: int = 16  # examples per step (per device)
    lr: float = 1e-3  # peak AdamW learning rate (adapters take far higher rates than full tuning)
    warmup_steps: int = 10  # linear warmup, then cosine decay to 0
    weight_decay: float = 0.0
    eval_every: int = 40  # steps between held-out evaluations (the loss curve's points)
    eval_examples: int = 256  # held-out examples scored (before, during, after); 0 = all
    save_every: int = 40  # steps between resumable checkpoints
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        self.adapter.validate()
        hf_training.validate_schedule(self)
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples: must not be negative (got {self.eval_examples})")


def encode_all(tokenizer, chats: list[list[dict]], max_len: int) -> tuple[list[dict], int]:
    """(encoded examples, number dropped for not fitting in max_len)."""
    encoded = [encode_chat(tokenizer, chat, max_len) for chat in chats]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def save_merged(model, tokenizer, out: Path) -> None:
    """save_pretrained of a plain model + tokenizer, generation stopping at `<|end|>` or eos."""
    model.generation_config.eos_token_id = [end_token_id(tokenizer), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_sft(settings: SftSettings, base_dir: Path, train_chats: list[list[dict]], eval_chats: list[list[dict]],
              work_dir: Path, out_dir: Path, log: hf_training.Log = print) -> dict:
    """Fine-tune, write out_dir atomically, and return {"metrics": ..., "history": [...]}."""
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    t0 = time.perf_counter()
    s = settings
    s.validate()
    base_dir, work_dir, out_dir = Path(base_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_ex, train_dropped = encode_all(tokenizer, train_chats, s.max_len)
    eval_ex, eval_dropped = encode_all(tokenizer, eval_chats, s.max_len)
    if not train_ex:
        raise ValueError(f"max_len: none of the {len(train_chats)} training chats fits in {s.max_len} tokens")
    if not eval_ex:
        raise ValueError(f"max_len: none of the {len(eval_chats)} held-out chats fits in {s.max_len} tokens")
    if s.eval_examples:
        eval_ex = eval_ex[: s.eval_examples]
    pad_id = tokenizer.pad_token_id

    # "Before" is the base as released (fp32), also for QLoRA, whose frozen copy is its 4-bit rounding.
    loss_before = reply_loss(adapters.load_model(base_dir), eval_ex, pad_id)
    torch.manual_seed(s.seed)
    model = adapters.attach_adapter(adapters.load_model(base_dir, four_bit=s.adapter.method == "qlora"), s.adapter)
    trainable, total = adapters.parameter_counts(model)
    log({"event": "start", "method": s.adapter.method, "trainable_parameters": trainable,
         "total_parameters": total, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
         "eval_reply_loss_before": loss_before})

    run = hf_training.run_identity({"settings": asdict(s), "train": train_ex, "eval": eval_ex},
                                   [base_dir / "model.safetensors"])
    resume_from = hf_training.prepare_work_dir(work_dir, run, log)
    args = TrainingArguments(
        **hf_training.common_arguments(work_dir, s.seed, s.save_every, s.log_every),
        max_steps=s.max_steps, per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
        eval_strategy="steps", eval_steps=s.eval_every)
    trainer = Trainer(model=model, args=args, train_dataset=train_ex, eval_dataset=eval_ex,
                      data_collator=PadCollator(pad_id))
    trainer.remove_callback(PrinterCallback)  # ProgressLog reports the same rows
    trainer.add_callback(hf_training.ProgressLog(log))
    t_train = time.perf_counter()
    trained = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - t_train
    history = [r for r in trainer.state.log_history if "loss" in r or "eval_loss" in r]

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "adapter")  # adapter_config.json + adapter_model.safetensors
        merged = adapters.merge_into_fp32(base_dir, tmp / "adapter")
        loss_after = reply_loss(merged, eval_ex, pad_id)
        save_merged(merged, tokenizer, tmp / "merged")
        tokens = sum(len(e["input_ids"]) for e in train_ex)
        metrics = {
            "method": s.adapter.method,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": trainable / total,
            "train_examples": len(train_ex),
            "eval_examples": len(eval_ex),
            "dropped_too_long": train_dropped + eval_dropped,
            "eval_reply_loss_before": loss_before,
            "eval_reply_loss_after": loss_after,
            "eval_reply_perplexity_before": math.exp(loss_before),
            "eval_reply_perplexity_after": math.exp(loss_after),
            "train_loss": trained.training_loss,
            "steps": s.max_steps,
            "epochs": s.max_steps * s.batch_size / len(train_ex),
            "train_seconds": train_seconds,
            "examples_per_second": trained.metrics.get("train_samples_per_second", 0.0),
            "mean_example_tokens": tokens / len(train_ex),
            "resumed_from": resume_from or "",
            "wall_seconds": time.perf_counter() - t0,
        }
        hf_training.write_run_files(tmp, metrics, {
            "settings": asdict(s), "base": str(base_dir), "peft_config": adapters.peft_config(s.adapter).to_dict(),
            "run_id": run}, history)
    log({"event": "done", **metrics})
    return {"metrics": metrics, "history": history}
