"""Preference alignment with DPO (TRL's `DPOTrainer`) on top of the instruction-tuned model, and the
preference accuracy every checkpoint is measured by.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.align import DpoSettings, preference_accuracy, train_dpo
    >>> from llm_assets.lib.posttrain.preferences import PreferencePair
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import load_model, save_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> pairs = [PreferencePair(f"What is {i} + 1?", f"It is {i + 1}.", f"It is {i + 7}.", f"p#L{i}") for i in range(12)]
    >>> tok = train_tokenizer([p.prompt + p.chosen + p.rejected for p in pairs], vocab_size=300)
    >>> root = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok,
    ...            root / "lora")                  # stands in for lora_checkpoint's merged model
    >>> accuracy = preference_accuracy(load_model(root / "lora"), tok, pairs[8:], max_len=64)
    >>> accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)      # the share of the 4 held-out pairs won
    True
    >>> settings = DpoSettings(r=4, alpha=8, max_len=64, max_steps=2, batch_size=4, lr=1e-2, warmup_steps=0,
    ...                        eval_every=2, save_every=2, log_every=1)
    >>> events = []
    >>> result = train_dpo(settings, root / "lora", pairs[:8], pairs[8:], root / "work", root / "out", log=events.append)
    >>> sorted(result.scores), result.scores["lora"].accuracy == accuracy, [e["event"] for e in events]
    (['aligned', 'lora'], True, ['start', 'train', 'train', 'eval', 'train', 'done'])
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['adapter', 'log_history.jsonl', 'merged', 'metrics.json', 'preference_scores.json', 'training_config.json']

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import Field

from llm_assets.lib.posttrain import adapters, hf_training
from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.posttrain.chat_data import encode_prompt_reply, reply_logprobs
from llm_assets.lib.posttrain.preferences import PreferencePair, prompt_messages
from llm_assets.lib.posttrain.sft import save_merged
from llm_assets.lib.pretrain.model_dir import adapter_dir, load_model, merged_dir, weights_file


class DpoSettings(adapters.AdapterSettings):
    """DPO: the fresh adapter's fields (inherited, flat in a run config; qlora is refused: DPO trains
    on the fp32 model) and the schedule; the launchpad of `aligned_checkpoint`."""

    beta: float = Field(0.1, description="DPO beta: how strongly the policy is held near the reference, "
                                         "the instruction-tuned model (higher = stay closer).")
    max_len: int = Field(256, description="Tokens per prompt + reply; pairs with a longer side are dropped and counted.")
    max_steps: int = Field(80, description="Optimizer steps.")
    batch_size: int = Field(8, description="Preference pairs per optimizer step (per device).")
    lr: float = Field(5e-4, description="Peak learning rate, linear warmup then cosine decay (TRL's default 1e-6 "
                                        "is for billion-parameter models; a small one barely moves).")
    warmup_steps: int = Field(10, description="Steps of linear warmup.")
    eval_every: int = Field(40, description="Steps between held-out evaluations.")
    eval_pairs: int = Field(0, description="Held-out pairs scored (0 = all; 426 on the demo: the accuracy's "
                                           "standard error is ~2.4 points).")
    save_every: int = Field(40, description="Steps between resumable Trainer checkpoints.")
    log_every: int = Field(10, description="Steps between the Trainer's training-loss log rows.")
    seed: int = Field(0, description="Seeds the adapter's initialization and the data order.")

    def validate(self) -> None:
        self.adapter.validate()
        if self.method == "qlora":
            raise ValueError("method: qlora is for instruction tuning; DPO trains a LoRA on the fp32 model")
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


@dataclass(frozen=True)
class PreferenceScores:
    """Reference-free preference figures of one model on encoded held-out pairs."""

    accuracy: float  # share of pairs whose chosen reply has the higher mean log-probability per token
    accuracy_summed: float  # the same by summed log-probability (favours the shorter reply)
    logp_chosen: float  # mean summed log-probability of the chosen replies
    logp_rejected: float  # of the rejected replies
    logp_margin: float  # mean of chosen minus rejected summed log-probability


def preference_scores(model, encoded: list[tuple[dict, dict]], pad_id: int) -> PreferenceScores:
    """The PreferenceScores of `model` on the encoded (chosen, rejected) pairs."""
    chosen = reply_logprobs(model, [c for c, _ in encoded], pad_id)
    rejected = reply_logprobs(model, [r for _, r in encoded], pad_id)
    wins = [c / nc > r / nr for (c, nc), (r, nr) in zip(chosen, rejected)]
    summed_wins = [c > r for (c, _), (r, _) in zip(chosen, rejected)]
    n = len(encoded)
    return PreferenceScores(accuracy=sum(wins) / n,
                            accuracy_summed=sum(summed_wins) / n,
                            logp_chosen=sum(c for c, _ in chosen) / n,
                            logp_rejected=sum(r for r, _ in rejected) / n,
                            logp_margin=sum(c - r for (c, _), (r, _) in zip(chosen, rejected)) / n)


def preference_accuracy(model, tokenizer, pairs: list[PreferencePair], max_len: int) -> float:
    encoded, _ = encode_pairs(tokenizer, pairs, max_len)
    return preference_scores(model, encoded, tokenizer.pad_token_id).accuracy


def trl_records(pairs: list[PreferencePair]) -> list[dict]:
    """TRL's conversational preference format: the prompt as messages, each reply one message."""
    return [{"prompt": prompt_messages(p.prompt),
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]


@dataclass(frozen=True)
class DpoMetrics:
    """The figures of one run: metrics.json, the "done" log event and the asset's metadata, flat and
    in this order (`as_dict`). Preference figures are held-out, per model: those compared ("base"),
    the reference ("lora") and the result ("aligned")."""

    beta: float  # DPO's beta
    train_pairs: int  # training pairs whose both replies fit in max_len
    eval_pairs: int  # held-out pairs scored
    dropped_too_long: int  # pairs of both splits left out (a side over max_len, or held out past eval_pairs)
    preference_accuracy: dict[str, float]  # per model: PreferenceScores.accuracy
    preference_accuracy_summed: dict[str, float]  # per model: PreferenceScores.accuracy_summed
    accuracy_gain_over_lora: float  # aligned minus lora accuracy
    aligned_logp_chosen: float  # mean summed log-probability of the chosen replies, aligned model
    aligned_logp_rejected: float
    lora_logp_chosen: float  # the same for the reference
    lora_logp_rejected: float
    # DPO's own held-out figures (NaN when TRL gave none): implicit rewards beta * (log pi - log pi_ref)
    eval_reward_margin: float  # mean reward of chosen minus rejected
    eval_reward_chosen: float
    eval_reward_rejected: float
    eval_rewards_accuracy: float  # share of pairs where the chosen reply has the higher reward
    eval_dpo_loss: float
    train_loss: float  # the Trainer's mean training loss over the steps this session ran
    steps: int  # optimizer steps of the run (max_steps)
    train_seconds: float  # time in DPOTrainer.train()
    resumed_from: str  # the Trainer checkpoint this session resumed from; "" = a fresh start
    wall_seconds: float  # all of train_dpo, scoring and saving included

    def as_dict(self) -> dict:
        """The flat figures: a per-model field spreads into `<model>_<field>`
        (`base_preference_accuracy`, `lora_preference_accuracy`, ...)."""
        flat = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                flat.update({f"{model}_{name}": v for model, v in value.items()})
            else:
                flat[name] = value
        return flat


@dataclass(frozen=True)
class DpoResult:
    """What train_dpo returns."""

    metrics: DpoMetrics
    scores: dict[str, PreferenceScores]  # held-out figures per model: compared ones, "lora", "aligned"
    history: list[dict]  # the Trainer's log rows with a training "loss" or an "eval_loss" (the loss curve)


def encode_splits(tokenizer, train_pairs: list[PreferencePair], eval_pairs: list[PreferencePair],
                  s: DpoSettings) -> tuple[list[tuple[dict, dict]], list[dict], list[dict], int]:
    """(encoded held-out pairs, TRL records of the training and held-out pairs, number of pairs
    left out): pairs with a side over max_len are dropped, the held-out ones cut to eval_pairs."""
    train_enc, train_kept = encode_pairs(tokenizer, train_pairs, s.max_len)
    eval_enc, eval_kept = encode_pairs(tokenizer, eval_pairs, s.max_len)
    if not train_enc or not eval_enc:
        raise ValueError(f"max_len: no {'training' if not train_enc else 'held-out'} preference pair fits in {s.max_len} tokens")
    if s.eval_pairs:
        eval_enc, eval_kept = eval_enc[: s.eval_pairs], eval_kept[: s.eval_pairs]
    left_out = len(train_pairs) - len(train_kept) + len(eval_pairs) - len(eval_kept)
    return (eval_enc, trl_records([train_pairs[i] for i in train_kept]),
            trl_records([eval_pairs[i] for i in eval_kept]), left_out)


def make_trainer(model, tokenizer, s: DpoSettings, work_dir: Path, train_records: list[dict],
                 eval_records: list[dict]):
    """TRL's DPOTrainer on a fresh LoRA adapter (`peft_config`): the model with the adapter switched
    off is the frozen reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **hf_training.common_arguments(work_dir, s.seed, s.save_every, s.log_every),
        beta=s.beta, max_length=s.max_len, max_steps=s.max_steps, learning_rate=s.lr,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        lr_scheduler_type="cosine", warmup_steps=s.warmup_steps, eval_strategy="steps", eval_steps=s.eval_every)
    return DPOTrainer(model=model, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(train_records), eval_dataset=Dataset.from_list(eval_records),
                      peft_config=adapters.peft_config(s.adapter))


def final_dpo_eval(trainer, history: list[dict], max_steps: int) -> dict:
    """DPO's own held-out figures (reward margin, accuracy, log-probs against the reference): the
    evaluation at the last step when there was one, else one now."""
    last = next((r for r in reversed(history) if "eval_loss" in r), None)
    return last if last and last["step"] == max_steps else trainer.evaluate()


def train_dpo(settings: DpoSettings, sft_dir: Path, train_pairs: list[PreferencePair],
              eval_pairs: list[PreferencePair], work_dir: Path, out_dir: Path, log: hf_training.Log = print,
              compare: dict[str, Path] | None = None) -> DpoResult:
    """Align the model in `sft_dir` (a merged, plain model), write out_dir atomically, and return
    the run's figures, the held-out preference scores of the aligned model and of every model in
    `compare` ({"base": dir, ...}), the reference (`sft_dir`) as "lora", and the loss history."""
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()  # TRL's tokenization bars would flood the run log

    t0 = time.perf_counter()
    s = settings
    s.validate()
    sft_dir, work_dir, out_dir = Path(sft_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pad_id = tokenizer.pad_token_id
    eval_enc, train_records, eval_records, left_out = encode_splits(tokenizer, train_pairs, eval_pairs, s)

    scores = {name: preference_scores(load_model(path), eval_enc, pad_id) for name, path in (compare or {}).items()}
    torch.manual_seed(s.seed)
    model = load_model(sft_dir)
    scores["lora"] = preference_scores(model, eval_enc, pad_id)
    log({"event": "start", "train_pairs": len(train_records), "eval_pairs": len(eval_records),
         **{f"{k}_accuracy": v.accuracy for k, v in scores.items()}})

    run = hf_training.run_identity({"settings": s.model_dump(), "train": train_records, "eval": eval_records},
                                   [weights_file(sft_dir)])
    resume_from = hf_training.prepare_work_dir(work_dir, run, log)
    trainer = make_trainer(model, tokenizer, s, work_dir, train_records, eval_records)
    trained, train_seconds, history = hf_training.fit(trainer, resume_from, log)
    dpo_eval = final_dpo_eval(trainer, history, s.max_steps)

    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(adapter_dir(tmp))
        merged = adapters.merge_into_fp32(sft_dir, adapter_dir(tmp))
        scores["aligned"] = preference_scores(merged, eval_enc, pad_id)
        save_merged(merged, tokenizer, merged_dir(tmp))
        metrics = DpoMetrics(
            beta=s.beta,
            train_pairs=len(train_records),
            eval_pairs=len(eval_records),
            dropped_too_long=left_out,
            preference_accuracy={name: v.accuracy for name, v in scores.items()},
            preference_accuracy_summed={name: v.accuracy_summed for name, v in scores.items()},
            accuracy_gain_over_lora=scores["aligned"].accuracy - scores["lora"].accuracy,
            aligned_logp_chosen=scores["aligned"].logp_chosen,
            aligned_logp_rejected=scores["aligned"].logp_rejected,
            lora_logp_chosen=scores["lora"].logp_chosen,
            lora_logp_rejected=scores["lora"].logp_rejected,
            eval_reward_margin=dpo_eval.get("eval_rewards/margins", math.nan),
            eval_reward_chosen=dpo_eval.get("eval_rewards/chosen", math.nan),
            eval_reward_rejected=dpo_eval.get("eval_rewards/rejected", math.nan),
            eval_rewards_accuracy=dpo_eval.get("eval_rewards/accuracies", math.nan),
            eval_dpo_loss=dpo_eval.get("eval_loss", math.nan),
            train_loss=trained.training_loss,
            steps=s.max_steps,
            train_seconds=train_seconds,
            resumed_from=resume_from or "",
            wall_seconds=time.perf_counter() - t0,
        )
        (tmp / "preference_scores.json").write_text(json.dumps({n: asdict(v) for n, v in scores.items()}, indent=2))
        hf_training.write_run_files(tmp, metrics.as_dict(), {
            "settings": s.model_dump(), "reference": str(sft_dir), "run_id": run,
            "peft_config": adapters.peft_config(s.adapter).to_dict()}, history)
    log({"event": "done", **metrics.as_dict()})
    return DpoResult(metrics, scores, history)
