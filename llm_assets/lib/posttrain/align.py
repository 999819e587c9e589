"""Preference alignment with DPO (TRL's `DPOTrainer`) on top of the instruction-tuned model, and the
preference accuracy every checkpoint is measured by.

    result = train_dpo(settings, sft_dir, train_pairs, eval_pairs, work_dir, out_dir, log=print)
    accuracy = preference_accuracy(model, tokenizer, pairs, max_len=256)

The policy is the instruction-tuned (merged) model with a fresh LoRA adapter; the frozen reference
is the same model with the adapter switched off, which TRL does by itself when given `peft_config`
(no second copy of the weights in memory). The adapter is merged into an fp32 copy at the end, so
the aligned model is again a plain `AutoModelForCausalLM` directory.

Preference accuracy (the quality bar) is reference-free, so base, LoRA and aligned models are
measured by the same rule: the share of held-out pairs where the model gives the chosen reply a
higher mean log-probability per token than the rejected one, both scored as the reply to the same
chat prompt (`<eos> prompt reply <|end|>`, chat_data.py). Per token, because summed log-likelihoods
of replies of different lengths mostly compare their lengths (lm-eval-harness's `acc_norm` reasons
the same way); the summed variant is reported beside it as `accuracy_summed`, and DPO's own reward
accuracy, which needs the reference, as `eval_rewards_accuracy`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm_assets.lib.posttrain import adapters, hf_training
from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.posttrain.chat_data import encode_prompt_reply, reply_logprobs
from llm_assets.lib.posttrain.preferences import PreferencePair, prompt_messages
from llm_assets.lib.posttrain.sft import save_merged



@dataclass
class DpoSettings:
    beta: float = 0.1  # strength of the pull towards the reference (higher = stay closer)
    adapter: adapters.AdapterSettings = field(default_factory=adapters.AdapterSettings)
    max_len: int = 256  # tokens per prompt + reply; pairs where either side is longer are dropped
    max_steps: int = 80
    batch_size: int = 8  # pairs per step
    lr: float = 5e-4  # TRL's default 1e-6 is for billion-parameter models; a small one barely moves
    warmup_steps: int = 10
    eval_every: int = 40
    eval_pairs: int = 0  # held-out pairs scored; 0 = all (426 on the demo: the accuracy's standard error ~2.4 points)
    save_every: int = 40
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        self.adapter.validate()
        if self.adapter.method == "qlora":
            raise ValueError("adapter.method: qlora is for instruction tuning; DPO trains a LoRA on the fp32 model")
        if self.beta <= 0:
            raise ValueError(f"beta: must be positive (got {self.beta})")
        hf_training.validate_schedule(self)


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_len: int) -> tuple[list[tuple[dict, dict]], list[int]]:
    """((chosen, rejected) encodings, indices of the pairs kept): a pair is kept when both fit."""
    encoded, kept = [], []
    for i, p in enumerate(pairs):
        messages = prompt_messages(p.prompt)
        chosen = encode_prompt_reply(tokenizer, messages, p.chosen, max_len)
        rejected = encode_prompt_reply(tokenizer, messages, p.rejected, max_len)
        if chosen and rejected:
            encoded.append((chosen, rejected))
            kept.append(i)
    return encoded, kept


def preference_scores(model, encoded: list[tuple[dict, dict]], pad_id: int) -> dict:
    """Reference-free preference figures of `model`: accuracy (chosen has the higher mean per-token
    log-probability), accuracy_summed (the higher summed log-probability), mean summed
    log-probabilities of chosen and rejected replies, and their mean margin."""
    chosen = reply_logprobs(model, [c for c, _ in encoded], pad_id)
    rejected = reply_logprobs(model, [r for _, r in encoded], pad_id)
    wins = [c / nc > r / nr for (c, nc), (r, nr) in zip(chosen, rejected)]
    summed_wins = [c > r for (c, _), (r, _) in zip(chosen, rejected)]
    n = len(encoded)
    return {"accuracy": sum(wins) / n,
            "accuracy_summed": sum(summed_wins) / n,
            "logp_chosen": sum(c for c, _ in chosen) / n,
            "logp_rejected": sum(r for r, _ in rejected) / n,
            "logp_margin": sum(c - r for (c, _), (r, _) in zip(chosen, rejected)) / n}


def preference_accuracy(model, tokenizer, pairs: list[PreferencePair], max_len: int) -> float:
    encoded, _ = encode_pairs(tokenizer, pairs, max_len)
    return preference_scores(model, encoded, tokenizer.pad_token_id)["accuracy"]


def trl_records(pairs: list[PreferencePair]) -> list[dict]:
    """TRL's conversational preference format: the prompt as messages, each reply one message."""
    return [{"prompt": prompt_messages(p.prompt),
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]


def train_dpo(settings: DpoSettings, sft_dir: Path, train_pairs: list[PreferencePair],
              eval_pairs: list[PreferencePair], work_dir: Path, out_dir: Path, log: hf_training.Log = print,
              compare: dict[str, Path] | None = None) -> dict:
    """Align the model in `sft_dir` (a merged, plain model), write out_dir atomically, and return
    {"metrics", "history", "accuracy"}: held-out preference figures of the aligned model and of
    every model in `compare` ({"base": dir, ...}), the reference (`sft_dir`) as "lora"."""
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()  # TRL's tokenization bars would flood the run log

    t0 = time.perf_counter()
    s = settings
    s.validate()
    sft_dir, work_dir, out_dir = Path(sft_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pad_id = tokenizer.pad_token_id
    train_enc, train_kept = encode_pairs(tokenizer, train_pairs, s.max_len)
    eval_enc, eval_kept = encode_pairs(tokenizer, eval_pairs, s.max_len)
    if not train_enc or not eval_enc:
        raise ValueError(f"max_len: no {'training' if not train_enc else 'held-out'} preference pair fits in {s.max_len} tokens")
    if s.eval_pairs:
        eval_enc, eval_kept = eval_enc[: s.eval_pairs], eval_kept[: s.eval_pairs]
    train_records = trl_records([train_pairs[i] for i in train_kept])
    eval_records = trl_records([eval_pairs[i] for i in eval_kept])

    scores = {}
    for name, path in (compare or {}).items():
        scores[name] = preference_scores(adapters.load_model(path), eval_enc, pad_id)
    torch.manual_seed(s.seed)
    model = adapters.load_model(sft_dir)
    scores["lora"] = preference_scores(model, eval_enc, pad_id)
    log({"event": "start", "train_pairs": len(train_records), "eval_pairs": len(eval_records),
         **{f"{k}_accuracy": v["accuracy"] for k, v in scores.items()}})

    run = hf_training.run_identity({"settings": asdict(s), "train": train_records, "eval": eval_records},
                                   [sft_dir / "model.safetensors"])
    resume_from = hf_training.prepare_work_dir(work_dir, run, log)
    config = DPOConfig(
        **hf_training.common_arguments(work_dir, s.seed, s.save_every, s.log_every),
        beta=s.beta, max_length=s.max_len, max_steps=s.max_steps, learning_rate=s.lr,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        lr_scheduler_type="cosine", warmup_steps=s.warmup_steps, eval_strategy="steps", eval_steps=s.eval_every)
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(train_records), eval_dataset=Dataset.from_list(eval_records),
                         peft_config=adapters.peft_config(s.adapter))
    trainer.remove_callback(PrinterCallback)  # ProgressLog reports the same rows
    trainer.add_callback(hf_training.ProgressLog(log))
    t_train = time.perf_counter()
    trained = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - t_train
    history = [r for r in trainer.state.log_history if "loss" in r or "eval_loss" in r]
    # DPO's own held-out figures (reward margin, accuracy, log-probs against the reference): the
    # evaluation at the last step when there was one, else one now.
    last = next((r for r in reversed(history) if "eval_loss" in r), None)
    dpo_eval = last if last and last["step"] == s.max_steps else trainer.evaluate()

    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp / "adapter")
        merged = adapters.merge_into_fp32(sft_dir, tmp / "adapter")
        scores["aligned"] = preference_scores(merged, eval_enc, pad_id)
        save_merged(merged, tokenizer, tmp / "merged")
        metrics = {
            "beta": s.beta,
            "train_pairs": len(train_records),
            "eval_pairs": len(eval_records),
            "dropped_too_long": len(train_pairs) - len(train_kept) + len(eval_pairs) - len(eval_kept),
            **{f"{name}_preference_accuracy": v["accuracy"] for name, v in scores.items()},
            **{f"{name}_preference_accuracy_summed": v["accuracy_summed"] for name, v in scores.items()},
            "accuracy_gain_over_lora": scores["aligned"]["accuracy"] - scores["lora"]["accuracy"],
            "aligned_logp_chosen": scores["aligned"]["logp_chosen"],
            "aligned_logp_rejected": scores["aligned"]["logp_rejected"],
            "lora_logp_chosen": scores["lora"]["logp_chosen"],
            "lora_logp_rejected": scores["lora"]["logp_rejected"],
            # DPO's own held-out figures: implicit rewards beta * (log pi - log pi_ref)
            "eval_reward_margin": dpo_eval.get("eval_rewards/margins", math.nan),
            "eval_reward_chosen": dpo_eval.get("eval_rewards/chosen", math.nan),
            "eval_reward_rejected": dpo_eval.get("eval_rewards/rejected", math.nan),
            "eval_rewards_accuracy": dpo_eval.get("eval_rewards/accuracies", math.nan),
            "eval_dpo_loss": dpo_eval.get("eval_loss", math.nan),
            "train_loss": trained.training_loss,
            "steps": s.max_steps,
            "train_seconds": train_seconds,
            "resumed_from": resume_from or "",
            "wall_seconds": time.perf_counter() - t0,
        }
        (tmp / "preference_scores.json").write_text(json.dumps(scores, indent=2))
        hf_training.write_run_files(tmp, metrics, {
            "settings": asdict(s), "reference": str(sft_dir), "run_id": run,
            "peft_config": adapters.peft_config(s.adapter).to_dict()}, history)
    log({"event": "done", **metrics})
    return {"metrics": metrics, "history": history, "scores": scores}
