"""Supervised instruction tuning of the base model with a PEFT adapter (LoRA, QLoRA or IA3).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.sft import SftSettings, train_sft
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(12)]
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> root = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok,
    ...            root / "base")                                # a (here untrained) base_checkpoint
    >>> settings = SftSettings(method="lora", r=4, alpha=8, max_len=64, max_steps=4, batch_size=4, lr=1e-2,
    ...                        warmup_steps=0, eval_every=2, eval_examples=4, save_every=4, log_every=2)
    >>> events = []
    >>> result = train_sft(settings, root / "base", chats[:8], chats[8:], root / "work", root / "out", log=events.append)
    >>> result.metrics.eval_reply_loss_after < result.metrics.eval_reply_loss_before
    True
    >>> [e["event"] for e in events]
    ['start', 'train', 'eval', 'train', 'eval', 'train', 'done']
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['adapter', 'log_history.jsonl', 'merged', 'metrics.json', 'training_config.json']

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import Field

from llm_assets.lib.posttrain import adapters, hf_training
from llm_assets.lib.pretrain.model_dir import adapter_dir, load_model, merged_dir, save_model, weights_file
from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.posttrain.chat_data import PadCollator, encode_chat, end_token_id, reply_loss


class SftSettings(adapters.AdapterSettings):
    """Instruction tuning: the adapter's fields (inherited, so a run config stays flat: `r: 8`, not
    `adapter: {r: 8}`) and the schedule; the launchpad of `lora_checkpoint`."""

    max_len: int = Field(256, description="Tokens per example, prompt and reply; longer examples are dropped and counted.")
    max_steps: int = Field(160, description="Optimizer steps.")
    batch_size: int = Field(16, description="Examples per optimizer step (per device).")
    lr: float = Field(1e-3, description="Peak AdamW learning rate, linear warmup then cosine decay to 0 "
                                        "(adapters take far higher rates than full fine-tuning).")
    warmup_steps: int = Field(10, description="Steps of linear warmup.")
    weight_decay: float = Field(0.0, description="The Trainer's AdamW decoupled weight decay (0 = none).")
    eval_every: int = Field(40, description="Steps between held-out evaluations (the loss curve's points).")
    eval_examples: int = Field(256, description="Held-out examples scored before, during and after training (0 = all).")
    save_every: int = Field(40, description="Steps between resumable Trainer checkpoints.")
    log_every: int = Field(10, description="Steps between the Trainer's training-loss log rows.")
    seed: int = Field(0, description="Seeds the adapter's initialization and the data order.")

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
    save_model(model, tokenizer, out)


@dataclass(frozen=True)
class SftMetrics:
    """The figures of one run: metrics.json, the "done" log event and the asset's metadata, in this
    order. Reply losses are mean nats per reply token on the same held-out chats."""

    method: str  # the adapter: lora | qlora | ia3
    trainable_parameters: int  # the adapter's
    total_parameters: int  # base and adapter together
    trainable_share: float  # trainable_parameters / total_parameters
    train_examples: int  # training chats that fit in max_len
    eval_examples: int  # held-out chats scored (at most eval_examples)
    dropped_too_long: int  # chats of both splits longer than max_len
    eval_reply_loss_before: float  # the base model (fp32, also for QLoRA)
    eval_reply_loss_after: float  # the merged fine-tuned model
    eval_reply_perplexity_before: float  # exp(eval_reply_loss_before)
    eval_reply_perplexity_after: float  # exp(eval_reply_loss_after)
    train_loss: float  # the Trainer's mean training loss over the steps this session ran
    steps: int  # optimizer steps of the run (max_steps)
    epochs: float  # passes over the training examples: steps * batch_size / train_examples
    train_seconds: float  # time in Trainer.train()
    examples_per_second: float  # the Trainer's train_samples_per_second (0 when it gave none)
    mean_example_tokens: float  # prompt + reply tokens per training example
    resumed_from: str  # the Trainer checkpoint this session resumed from; "" = a fresh start
    wall_seconds: float  # all of train_sft, loading and saving included


@dataclass(frozen=True)
class SftResult:
    """What train_sft returns."""

    metrics: SftMetrics
    history: list[dict]  # the Trainer's log rows with a training "loss" or an "eval_loss" (the loss curve)


def encode_splits(tokenizer, train_chats: list[list[dict]], eval_chats: list[list[dict]],
                  s: SftSettings) -> tuple[list[dict], list[dict], int]:
    """(training examples, held-out examples, number dropped for not fitting in max_len); the
    held-out ones cut to eval_examples. Raises when a split has none left."""
    train_ex, train_dropped = encode_all(tokenizer, train_chats, s.max_len)
    eval_ex, eval_dropped = encode_all(tokenizer, eval_chats, s.max_len)
    if not train_ex:
        raise ValueError(f"max_len: none of the {len(train_chats)} training chats fits in {s.max_len} tokens")
    if not eval_ex:
        raise ValueError(f"max_len: none of the {len(eval_chats)} held-out chats fits in {s.max_len} tokens")
    if s.eval_examples:
        eval_ex = eval_ex[: s.eval_examples]
    return train_ex, eval_ex, train_dropped + eval_dropped


def make_trainer(model, s: SftSettings, work_dir: Path, train_ex: list[dict], eval_ex: list[dict], pad_id: int):
    """A plain `transformers.Trainer` on the adapter: cosine schedule, held-out loss every eval_every."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        **hf_training.common_arguments(work_dir, s.seed, s.save_every, s.log_every),
        max_steps=s.max_steps, per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
        eval_strategy="steps", eval_steps=s.eval_every)
    return Trainer(model=model, args=args, train_dataset=train_ex, eval_dataset=eval_ex,
                   data_collator=PadCollator(pad_id))


def train_sft(settings: SftSettings, base_dir: Path, train_chats: list[list[dict]], eval_chats: list[list[dict]],
              work_dir: Path, out_dir: Path, log: hf_training.Log = print) -> SftResult:
    """Fine-tune, write out_dir atomically, and return the run's figures and loss history."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    s = settings
    s.validate()
    base_dir, work_dir, out_dir = Path(base_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_ex, eval_ex, dropped = encode_splits(tokenizer, train_chats, eval_chats, s)
    pad_id = tokenizer.pad_token_id

    # "Before" is the base as released (fp32), also for QLoRA, whose frozen copy is its 4-bit rounding.
    loss_before = reply_loss(load_model(base_dir), eval_ex, pad_id)
    torch.manual_seed(s.seed)
    model = adapters.attach_adapter(load_model(base_dir, four_bit=s.adapter.method == "qlora"), s.adapter)
    trainable, total = adapters.parameter_counts(model)
    log({"event": "start", "method": s.adapter.method, "trainable_parameters": trainable,
         "total_parameters": total, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
         "eval_reply_loss_before": loss_before})

    run = hf_training.run_identity({"settings": s.model_dump(), "train": train_ex, "eval": eval_ex},
                                   [weights_file(base_dir)])
    resume_from = hf_training.prepare_work_dir(work_dir, run, log)
    trainer = make_trainer(model, s, work_dir, train_ex, eval_ex, pad_id)
    trained, train_seconds, history = hf_training.fit(trainer, resume_from, log)

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(adapter_dir(tmp))  # adapter_config.json + adapter_model.safetensors
        merged = adapters.merge_into_fp32(base_dir, adapter_dir(tmp))
        loss_after = reply_loss(merged, eval_ex, pad_id)
        save_merged(merged, tokenizer, merged_dir(tmp))
        tokens = sum(len(e["input_ids"]) for e in train_ex)
        metrics = SftMetrics(
            method=s.adapter.method,
            trainable_parameters=trainable,
            total_parameters=total,
            trainable_share=trainable / total,
            train_examples=len(train_ex),
            eval_examples=len(eval_ex),
            dropped_too_long=dropped,
            eval_reply_loss_before=loss_before,
            eval_reply_loss_after=loss_after,
            eval_reply_perplexity_before=math.exp(loss_before),
            eval_reply_perplexity_after=math.exp(loss_after),
            train_loss=trained.training_loss,
            steps=s.max_steps,
            epochs=s.max_steps * s.batch_size / len(train_ex),
            train_seconds=train_seconds,
            examples_per_second=trained.metrics.get("train_samples_per_second", 0.0),
            mean_example_tokens=tokens / len(train_ex),
            resumed_from=resume_from or "",
            wall_seconds=time.perf_counter() - t0,
        )
        hf_training.write_run_files(tmp, asdict(metrics), {
            "settings": s.model_dump(), "base": str(base_dir), "peft_config": adapters.peft_config(s.adapter).to_dict(),
            "run_id": run}, history)
    log({"event": "done", **asdict(metrics)})
    return SftResult(metrics, history)
