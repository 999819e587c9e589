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
    >>> settings = SftSettings(method="lora", r=4, alpha=8, max_len=64, epochs=2, batch_size=4, lr=1e-2,
    ...                        warmup_ratio=0, eval_every=2, eval_examples=4, log_every=2, precision="fp32")
    >>> events = []
    >>> result = train_sft(settings, root / "base", chats[:8], chats[8:], root / "work", root / "out", log=events.append)
    >>> m = result.metrics                             # 2 epochs of 8 chats, 4 a step: 4 steps
    >>> m.planned_steps, m.steps_run, m.eval_reply_loss_after < m.eval_reply_loss_before
    (4, 4, True)
    >>> abs(m.eval_reply_loss_after - m.best_eval_loss) < 1e-3  # merged/ is the best checkpoint
    True
    >>> [e["event"] for e in events]
    ['start', 'train', 'eval', 'train', 'eval', 'train', 'done']
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['adapter', 'log_history.jsonl', 'merged', 'metrics.json', 'training_config.json']

Chats are lists of {role, content} messages ending in the assistant reply to learn. They are
encoded with the base's chat template (see chat_data.py: loss on the reply only) and trained with a
plain `transformers.Trainer` on the adapter's parameters; the base stays frozen. The schedule is
hf_training's: epochs capped by max_steps, a held-out evaluation and checkpoint every eval_every
steps, and the checkpoint of the lowest held-out reply loss is what `adapter/` and `merged/` hold
(the metrics say at which step, and from which step on held-out loss rose while training loss still
fell: overfitting). A killed run resumes from its last Trainer checkpoint.

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
from llm_assets.lib.posttrain.chat_data import PadCollator, TooLong, end_token_id, fit, reply_loss


class SftSettings(hf_training.ScheduleSettings, adapters.AdapterSettings):
    """Instruction tuning: the adapter's fields and the schedule's (inherited, so a run config stays
    flat: `r: 8`, not `adapter: {r: 8}`) and eval_examples; the launchpad of `lora_checkpoint`."""

    eval_examples: int = Field(256, description="Held-out examples scored before, during and after training (0 = all).")
    max_steps: int = hf_training.schedule_field("max_steps", 320)
    eval_every: int = hf_training.schedule_field("eval_every", 80)

    def validate(self) -> None:
        self.adapter.validate()
        hf_training.validate_schedule(self)
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples: must not be negative (got {self.eval_examples})")


def encode_all(tokenizer, chats: list[list[dict]], max_len: int, sources: list[str]) -> tuple[list[dict], TooLong]:
    """(encoded examples, the chats longer than max_len by source: truncated to fit or dropped)."""
    kept, too_long = [], TooLong()
    for chat, source in zip(chats, sources, strict=True):
        fitted = fit(tokenizer, chat[:-1], [chat[-1]["content"]], max_len)
        too_long.add(source, fitted)
        if fitted:
            kept.append(fitted.example())
    return kept, too_long


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
    dropped_too_long: int  # chats of both splits whose frame alone is over max_len (longer ones are truncated)
    truncated_to_fit: int  # chats of both splits over max_len, cut to fit (chat_data.fit)
    too_long_examples: str  # the first few of each, by source
    eval_reply_loss_before: float  # the base model (fp32, also for QLoRA)
    eval_reply_loss_after: float  # the merged fine-tuned model: the best checkpoint
    eval_reply_perplexity_before: float  # exp(eval_reply_loss_before)
    eval_reply_perplexity_after: float  # exp(eval_reply_loss_after)
    train_loss: float  # the Trainer's mean training loss over the steps this session ran
    planned_steps: int  # min(max_steps, ceil(epochs x train_examples / batch_size))
    steps_run: int  # optimizer steps done (fewer than planned when stopped early)
    epochs: float  # passes over the training examples actually run (the Trainer's epoch counter)
    stopped_early: bool  # patience ran out before the planned steps
    best_step: int  # the evaluation of the lowest held-out loss: the checkpoint adapter/ and merged/ hold
    best_eval_loss: float  # the Trainer's held-out loss there (bf16 autocast when the run used it)
    last_eval_loss: float  # at the last evaluation
    overfitting_from_step: int  # after this step held-out loss rose while training loss fell; -1 = never
    train_seconds: float  # time in Trainer.train()
    examples_per_second: float  # the Trainer's train_samples_per_second (0 when it gave none)
    mean_example_tokens: float  # prompt + reply tokens per training example
    precision: str  # what the run computed in: bf16 (autocast) or fp32
    resumed_from: str  # the Trainer checkpoint this session resumed from; "" = a fresh start
    wall_seconds: float  # all of train_sft, loading and saving included


@dataclass(frozen=True)
class SftResult:
    """What train_sft returns."""

    metrics: SftMetrics
    history: list[dict]  # the Trainer's log rows with a training "loss" or an "eval_loss" (the loss curve)


def encode_splits(tokenizer, train_chats: list[list[dict]], eval_chats: list[list[dict]], s: SftSettings,
                  sources: tuple[list[str], list[str]] | None = None) -> tuple[list[dict], list[dict], TooLong]:
    """(training examples, held-out examples, the chats over max_len by source: truncated or
    dropped); the held-out ones cut to eval_examples. Raises when a split has none left. Without
    `sources` a chat is named by its split and index."""
    train_names, eval_names = sources or ([f"train[{i}]" for i in range(len(train_chats))],
                                          [f"validation[{i}]" for i in range(len(eval_chats))])
    train_ex, too_long = encode_all(tokenizer, train_chats, s.max_len, train_names)
    eval_ex, eval_too_long = encode_all(tokenizer, eval_chats, s.max_len, eval_names)
    if not train_ex:
        raise ValueError(f"max_len: none of the {len(train_chats)} training chats fits in {s.max_len} tokens")
    if not eval_ex:
        raise ValueError(f"max_len: none of the {len(eval_chats)} held-out chats fits in {s.max_len} tokens")
    if s.eval_examples:
        eval_ex = eval_ex[: s.eval_examples]
    too_long += eval_too_long
    return train_ex, eval_ex, too_long


def make_trainer(model, s: SftSettings, work_dir: Path, train_ex: list[dict], eval_ex: list[dict], pad_id: int):
    """A plain `transformers.Trainer` on the adapter with the shared schedule (hf_training), batches
    drawn from groups of similar length: random batches of the demo's chats are half padding (2.0x
    the real tokens, 1.04x grouped), so grouping makes a step about twice as cheap."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**hf_training.trainer_arguments(s, work_dir, len(train_ex)),
                             train_sampling_strategy="group_by_length")
    return Trainer(model=model, args=args, train_dataset=train_ex, eval_dataset=eval_ex,
                   data_collator=PadCollator(pad_id), callbacks=hf_training.schedule_callbacks(s))


def train_sft(settings: SftSettings, base_dir: Path, train_chats: list[list[dict]], eval_chats: list[list[dict]],
              work_dir: Path, out_dir: Path, log: hf_training.Log = print,
              sources: tuple[list[str], list[str]] | None = None) -> SftResult | None:
    """Fine-tune, write out_dir atomically, and return the run's figures and loss history (None on
    the other ranks of a DDP run: rank 0 writes and returns). `sources` name the chats of each split
    in the metrics (those truncated or dropped as too long)."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    s = settings
    s.validate()
    base_dir, work_dir, out_dir = Path(base_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_ex, eval_ex, too_long = encode_splits(tokenizer, train_chats, eval_chats, s, sources)
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
    if not hf_training.is_main_process():
        return None  # DDP: every rank holds the same trained model; rank 0 alone merges, scores and writes

    with atomic_dir(out_dir) as tmp:
        # the Trainer loaded the best checkpoint's adapter into `model` (load_best_model_at_end)
        model.save_pretrained(adapter_dir(tmp))  # adapter_config.json + adapter_model.safetensors
        merged = adapters.merge_into_fp32(base_dir, adapter_dir(tmp))
        loss_after = reply_loss(merged, eval_ex, pad_id)
        save_merged(merged, tokenizer, merged_dir(tmp))
        tokens = sum(len(e["input_ids"]) for e in train_ex)
        planned = hf_training.planned_steps(s, len(train_ex))
        summary = hf_training.selection_summary(history, planned)
        metrics = SftMetrics(
            method=s.adapter.method,
            trainable_parameters=trainable,
            total_parameters=total,
            trainable_share=trainable / total,
            train_examples=len(train_ex),
            eval_examples=len(eval_ex),
            dropped_too_long=len(too_long.dropped),
            truncated_to_fit=len(too_long.truncated),
            too_long_examples=too_long.examples(),
            eval_reply_loss_before=loss_before,
            eval_reply_loss_after=loss_after,
            eval_reply_perplexity_before=math.exp(loss_before),
            eval_reply_perplexity_after=math.exp(loss_after),
            train_loss=trained.training_loss,
            planned_steps=planned,
            steps_run=summary["steps_run"],
            epochs=trainer.state.epoch,
            stopped_early=summary["stopped_early"],
            best_step=summary["best_step"],
            best_eval_loss=summary["best_eval_loss"],
            last_eval_loss=summary["last_eval_loss"],
            overfitting_from_step=summary["overfitting_from_step"],
            train_seconds=train_seconds,
            examples_per_second=trained.metrics.get("train_samples_per_second", 0.0),
            mean_example_tokens=tokens / len(train_ex),
            precision="bf16" if hf_training.uses_bf16(s.precision) else "fp32",
            resumed_from=resume_from or "",
            wall_seconds=time.perf_counter() - t0,
        )
        hf_training.write_run_files(tmp, asdict(metrics), {
            "settings": s.model_dump(), "base": str(base_dir), "peft_config": adapters.peft_config(s.adapter).to_dict(),
            "run_id": run}, history)
    log({"event": "done", **asdict(metrics)})
    return SftResult(metrics, history)


def read_result(out_dir: Path) -> SftResult:
    """The SftResult train_sft returned, read back from the files it wrote in out_dir."""
    metrics, history = hf_training.read_run_files(Path(out_dir))
    return SftResult(SftMetrics(**metrics), history)
