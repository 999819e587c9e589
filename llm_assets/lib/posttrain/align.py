"""Preference alignment of the instruction-tuned model (DPO by default; IPO, SimPO, ORPO or KTO by
`objective`, each a TRL trainer: preference_methods.py), and the preference accuracy every
checkpoint is measured by.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.align import AlignSettings, preference_accuracy, train_align
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
    >>> settings = AlignSettings(r=4, alpha=8, max_len=64, epochs=1, batch_size=4, lr=1e-2, warmup_ratio=0,
    ...                          eval_every=1, log_every=1)   # DPO + SFT term; 8 pairs, 4 a step: 2 steps
    >>> events = []
    >>> result = train_align(settings, root / "lora", pairs[:8], pairs[8:], root / "work", root / "out", log=events.append)
    >>> sorted(result.scores), result.scores["lora"].accuracy == accuracy, [e["event"] for e in events]
    (['aligned', 'lora'], True, ['start', 'train', 'eval', 'train', 'eval', 'train', 'done'])
    >>> m = result.metrics
    >>> m.objective, m.steps_run, m.best_step in (1, 2), m.method_accuracy_source
    ('dpo', 2, True, 'eval_rewards/accuracies')
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['adapter', 'log_history.jsonl', 'merged', 'metrics.json', 'preference_scores.json', 'training_config.json']

The policy is the instruction-tuned (merged) model with a fresh LoRA adapter; where the objective
needs a frozen reference (DPO, IPO, KTO) it is the same model with the adapter switched off, which
TRL does by itself when given `peft_config` (no second copy of the weights in memory). The schedule
is hf_training's (epochs capped by max_steps, the checkpoint of the lowest held-out loss of the
objective kept); the adapter is merged into an fp32 copy at the end, so the aligned model is again a
plain `AutoModelForCausalLM` directory.

Preference accuracy (the quality bar) is reference-free, so base, LoRA and aligned models are
measured by the same rule: the share of held-out pairs where the model gives the chosen reply a
higher mean log-probability per token than the rejected one, both scored as the reply to the same
chat prompt (`<eos> prompt reply <|end|>`, chat_data.py). Per token, because summed log-likelihoods
of replies of different lengths mostly compare their lengths (lm-eval-harness's `acc_norm` reasons
the same way); the summed variant is reported beside it as `accuracy_summed`. Each objective's own
held-out accuracy (DPO's reward accuracy against the reference, ...) is `method_accuracy`, with the
TRL key it came from in `method_accuracy_source`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from pydantic import Field

from llm_assets.lib.posttrain import adapters, hf_training, online_rl, preference_methods
from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.posttrain.chat_data import TooLong, fit, reply_logprobs
from llm_assets.lib.posttrain.preferences import PreferencePair, prompt_messages
from llm_assets.lib.posttrain.sft import save_merged
from llm_assets.lib.pretrain.model_dir import adapter_dir, load_model, merged_dir, weights_file

class AlignSettings(hf_training.ScheduleSettings, adapters.AdapterSettings):
    """Preference alignment: the objective, the fresh adapter's fields and the schedule's (inherited,
    flat in a run config; qlora is refused: alignment trains on the fp32 model); the launchpad of
    `aligned_checkpoint`."""

    objective: str = Field("dpo", description="dpo | ipo | simpo | orpo | kto: an offline preference objective on "
                                              "preference_dataset, each a TRL trainer (lib/posttrain/"
                                              "preference_methods.py); or grpo: online RL on sft_dataset's prompts, "
                                              "rewarded by ROUGE-L and reward_model (lib/posttrain/online_rl.py).")
    beta: float = Field(0.0, description="The objective's beta (0 = its usual value: 0.1 for dpo, ipo, kto and orpo, "
                                         "where it is the odds-ratio weight lambda; 2.0 for simpo; 0.04 for grpo, "
                                         "the KL coefficient). For DPO and GRPO: how strongly the policy is held "
                                         "near the reference (higher = stay closer).")
    sft_weight: float = Field(1.0, description="Weight of an SFT term (the NLL of the chosen reply) beside the "
                                               "preference loss, which keeps the policy fluent: dpo and ipo (TRL's "
                                               "loss_type [..., 'sft']), simpo (CPO's cpo_alpha); 0 = none. orpo "
                                               "has its own (weight 1), kto none.")
    eval_pairs: int = Field(0, description="Held-out pairs scored (0 = all; 200 on the demo: the accuracy's "
                                           "standard error is ~3 points).")
    num_generations: int = Field(8, description="grpo: replies sampled per prompt (the group each is compared with); "
                                                "a step takes batch_size prompts.")
    temperature: float = Field(0.3, description="grpo: sampling temperature of the replies (at 0.5-1.0 the demo "
                                                "model's samples were too poor to learn from).")
    max_completion_length: int = Field(48, description="grpo: tokens sampled per reply at most.")
    rouge_weight: float = Field(1.0, description="grpo: weight of ROUGE-L against the prompt's reference reply.")
    reward_model_weight: float = Field(0.1, description="grpo: weight of reward_model's score (0 = not used).")
    epochs: float = hf_training.schedule_field("epochs", 3.0)
    max_steps: int = hf_training.schedule_field("max_steps", 70)
    eval_every: int = hf_training.schedule_field("eval_every", 35)
    batch_size: int = hf_training.schedule_field("batch_size", 8)
    lr: float = hf_training.schedule_field("lr", 5e-4)

    def validate(self) -> None:
        self.adapter.validate()
        if self.method == "qlora":
            raise ValueError("method: qlora is for instruction tuning; alignment trains a LoRA on the fp32 model")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: must be one of {OBJECTIVES} (got {self.objective!r})")
        if min(self.rouge_weight, self.reward_model_weight) < 0 or self.num_generations < 2 or self.temperature <= 0:
            raise ValueError("grpo: weights must not be negative, num_generations must be >= 2 (a group) and "
                             f"temperature > 0 (got {self.rouge_weight}, {self.reward_model_weight}, "
                             f"{self.num_generations}, {self.temperature})")
        if self.beta < 0:
            raise ValueError(f"beta: must be positive, or 0 for the objective's usual value (got {self.beta})")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight: must not be negative (got {self.sft_weight})")
        if self.eval_pairs < 0:
            raise ValueError(f"eval_pairs: must not be negative (got {self.eval_pairs})")
        hf_training.validate_schedule(self)

    @property
    def objective_beta(self) -> float:
        """beta, or the objective's usual value when beta is 0."""
        return self.beta or {**preference_methods.USUAL_BETA, "grpo": 0.04}[self.objective]

    @property
    def online(self) -> bool:
        return self.objective in ONLINE


ONLINE = ("grpo",)
OBJECTIVES = preference_methods.OBJECTIVES + ONLINE
GRPO_ACCURACY = "reference-free accuracy on held-out pairs (grpo has no pairwise objective)"


@dataclass(frozen=True)
class OnlineData:
    """What grpo trains on: prompts with reference replies (sft_dataset's chats) and the reward model."""

    train_chats: list[list[dict]]
    eval_chats: list[list[dict]]  # held out: the checkpoint of the highest mean reward on them is kept
    reward_model_dir: Path | None


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_len: int
                 ) -> tuple[list[tuple[dict, dict]], list[PreferencePair], TooLong]:
    """((chosen, rejected) encodings, the pairs kept as encoded, those over max_len by source). Both
    sides must fit: the shared prompt is truncated once for both (chat_data.fit), so TRL is given
    the same prompt; each reply is cut at its end (TRL's max_length cuts it the same way)."""
    encoded, kept, too_long = [], [], TooLong()
    for p in pairs:
        fitted = fit(tokenizer, prompt_messages(p.prompt), [p.chosen, p.rejected], max_len)
        too_long.add(p.source, fitted)
        if fitted:
            encoded.append((fitted.example(0), fitted.example(1)))
            kept.append(replace(p, prompt=fitted.prompt) if fitted.truncated else p)
    return encoded, kept, too_long


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
    encoded, _, _ = encode_pairs(tokenizer, pairs, max_len)
    return preference_scores(model, encoded, tokenizer.pad_token_id).accuracy


def trl_records(pairs: list[PreferencePair]) -> list[dict]:
    """TRL's conversational preference format: the prompt as messages, each reply one message."""
    return [{"prompt": prompt_messages(p.prompt),
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]


@dataclass(frozen=True)
class AlignMetrics:
    """The figures of one run: metrics.json, the "done" log event and the asset's metadata, flat and
    in this order (`as_dict`). Preference figures are held-out, per model: those compared ("base"),
    the reference ("lora") and the result ("aligned")."""

    objective: str  # dpo | ipo | simpo | orpo | kto
    beta: float  # the objective's beta as used (objective_beta)
    sft_weight: float  # weight of the SFT term where the objective has one
    train_pairs: int  # training pairs whose both replies fit in max_len
    eval_pairs: int  # held-out pairs scored
    dropped_too_long: int  # pairs of both splits left out (a frame over max_len, or held out past eval_pairs)
    truncated_to_fit: int  # pairs of both splits over max_len, cut to fit (chat_data.fit)
    too_long_examples: str  # the first few truncated or dropped, by source
    preference_accuracy: dict[str, float]  # per model: PreferenceScores.accuracy
    preference_accuracy_summed: dict[str, float]  # per model: PreferenceScores.accuracy_summed
    accuracy_gain_over_lora: float  # aligned minus lora accuracy
    method_accuracy: float  # the objective's own held-out accuracy, at the best evaluation
    method_accuracy_source: str  # the TRL log key it was read from (or how it was computed)
    aligned_logp_chosen: float  # mean summed log-probability of the chosen replies, aligned model
    aligned_logp_rejected: float
    lora_logp_chosen: float  # the same for the reference
    lora_logp_rejected: float
    # the objective's own held-out figures at the best evaluation (NaN where TRL logs none): implicit
    # rewards, beta * (log pi - log ref) for dpo, ipo and kto, beta * mean log pi for simpo and orpo
    eval_reward_margin: float  # mean reward of chosen minus rejected
    eval_reward_chosen: float
    eval_reward_rejected: float
    train_loss: float  # the Trainer's mean training loss over the steps this session ran
    planned_steps: int  # min(max_steps, ceil(epochs x train_pairs / batch_size))
    steps_run: int  # optimizer steps done (fewer than planned when stopped early)
    epochs: float  # passes over the training pairs actually run (the Trainer's epoch counter)
    stopped_early: bool  # patience ran out before the planned steps
    best_step: int  # the evaluation of the lowest held-out loss of the objective: the model kept
    best_eval_loss: float  # that loss (the preference loss plus the SFT term where there is one); grpo: the
    # highest held-out mean reward, which selects its checkpoint (last_eval_loss likewise)
    last_eval_loss: float  # at the last evaluation
    overfitting_from_step: int  # after this step held-out loss rose while training loss fell; -1 = never
    train_seconds: float  # time in the trainer's train()
    precision: str  # what the run computed in: bf16 (autocast) or fp32
    resumed_from: str  # the Trainer checkpoint this session resumed from; "" = a fresh start
    wall_seconds: float  # all of train_align, scoring and saving included

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

    @classmethod
    def from_dict(cls, flat: dict, models: list[str]) -> AlignMetrics:
        """as_dict's inverse; `models` are the names the per-model fields were spread over."""
        return cls(**{f.name: {m: flat[f"{m}_{f.name}"] for m in models} if f.name in PER_MODEL else flat[f.name]
                      for f in fields(cls)})


PER_MODEL = ("preference_accuracy", "preference_accuracy_summed")  # AlignMetrics' fields holding a figure per model


@dataclass(frozen=True)
class AlignResult:
    """What train_align returns."""

    metrics: AlignMetrics
    scores: dict[str, PreferenceScores]  # held-out figures per model: compared ones, "lora", "aligned"
    history: list[dict]  # the Trainer's log rows with a training "loss" or an "eval_loss" (the loss curve)


def encode_splits(tokenizer, train_pairs: list[PreferencePair], eval_pairs: list[PreferencePair],
                  s: AlignSettings) -> tuple[list[tuple[dict, dict]], list[dict], list[dict], int, TooLong]:
    """(encoded held-out pairs, TRL records of the training and held-out pairs, number of pairs
    left out, pairs over max_len): long pairs are truncated, those that cannot be are dropped, the
    held-out ones cut to eval_pairs."""
    train_enc, train_kept, too_long = encode_pairs(tokenizer, train_pairs, s.max_len)
    eval_enc, eval_kept, eval_too_long = encode_pairs(tokenizer, eval_pairs, s.max_len)
    if not train_enc or not eval_enc:
        raise ValueError(f"max_len: no {'training' if not train_enc else 'held-out'} preference pair fits in {s.max_len} tokens")
    if s.eval_pairs:
        eval_enc, eval_kept = eval_enc[: s.eval_pairs], eval_kept[: s.eval_pairs]
    left_out = len(train_pairs) - len(train_kept) + len(eval_pairs) - len(eval_kept)
    too_long += eval_too_long
    return eval_enc, trl_records(train_kept), trl_records(eval_kept), left_out, too_long


def kto_implicit_reward_accuracy(policy, reference, encoded: list[tuple[dict, dict]], pad_id: int) -> float:
    """Share of pairs where log pi - log ref (summed over the reply; KTO's reward up to beta) is
    higher for the chosen reply than for the rejected one."""
    rewards = []
    for side in (0, 1):
        examples = [pair[side] for pair in encoded]
        rewards.append([p - r for (p, _), (r, _) in zip(reply_logprobs(policy, examples, pad_id),
                                                        reply_logprobs(reference, examples, pad_id))])
    return sum(c > r for c, r in zip(*rewards)) / len(encoded)


def best_evaluation(history: list[dict], best_step: int) -> dict:
    """The evaluation row at best_step: the objective's figures of the model that was kept."""
    return next(r for r in history if r["step"] == best_step and any(k.startswith("eval_") for k in r))


def align_metrics(s: AlignSettings, scores: dict, counts: tuple[int, int, int, TooLong], accuracy: tuple[float, str],
                  best: dict, summary: dict, run: dict) -> AlignMetrics:
    """AlignMetrics from the scores, (train, held-out, left-out, too long) pair counts, the method accuracy
    and its source, the best evaluation row, selection_summary and the run's figures (train_loss,
    planned_steps, epochs, train_seconds, resumed_from, t0)."""
    return AlignMetrics(
        objective=s.objective, beta=s.objective_beta, sft_weight=s.sft_weight,
        train_pairs=counts[0], eval_pairs=counts[1], dropped_too_long=counts[2],
        truncated_to_fit=len(counts[3].truncated), too_long_examples=counts[3].examples(),
        preference_accuracy={name: v.accuracy for name, v in scores.items()},
        preference_accuracy_summed={name: v.accuracy_summed for name, v in scores.items()},
        accuracy_gain_over_lora=scores["aligned"].accuracy - scores["lora"].accuracy,
        method_accuracy=accuracy[0], method_accuracy_source=accuracy[1],
        aligned_logp_chosen=scores["aligned"].logp_chosen, aligned_logp_rejected=scores["aligned"].logp_rejected,
        lora_logp_chosen=scores["lora"].logp_chosen, lora_logp_rejected=scores["lora"].logp_rejected,
        eval_reward_margin=best.get("eval_rewards/margins", math.nan),
        eval_reward_chosen=best.get("eval_rewards/chosen", math.nan),
        eval_reward_rejected=best.get("eval_rewards/rejected", math.nan),
        train_loss=run["train_loss"], planned_steps=run["planned_steps"], steps_run=summary["steps_run"],
        epochs=run["epochs"], stopped_early=summary["stopped_early"], best_step=summary["best_step"],
        best_eval_loss=summary["best_eval_loss"], last_eval_loss=summary["last_eval_loss"],
        overfitting_from_step=summary["overfitting_from_step"], train_seconds=run["train_seconds"],
        precision="bf16" if hf_training.uses_bf16(s.precision) else "fp32",
        resumed_from=run["resumed_from"], wall_seconds=time.perf_counter() - run["t0"])


def method_accuracy(s: AlignSettings, best: dict, aligned_accuracy: float, kto_accuracy) -> tuple[float, str]:
    """(the objective's own held-out accuracy, where it came from): TRL's log for the paired
    objectives, kto_accuracy() for KTO, the reference-free accuracy for grpo."""
    if s.objective == "kto":
        return kto_accuracy(), preference_methods.KTO_ACCURACY
    if s.online:
        return aligned_accuracy, GRPO_ACCURACY
    return preference_methods.method_accuracy(s.objective, best)


def train_align(settings: AlignSettings, sft_dir: Path, train_pairs: list[PreferencePair],
                eval_pairs: list[PreferencePair], work_dir: Path, out_dir: Path, log: hf_training.Log = print,
                compare: dict[str, Path] | None = None, online: OnlineData | None = None) -> AlignResult | None:
    """Align the model in `sft_dir` (a merged, plain model), write out_dir atomically, and return
    the run's figures, the held-out preference scores of the aligned model and of every model in
    `compare` ({"base": dir, ...}), the reference (`sft_dir`) as "lora", and the loss history
    (None on the other ranks of a DDP run: rank 0 writes and returns).
    An online objective (grpo) trains on `online` instead of the pairs, which still measure it."""
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()  # TRL's tokenization bars would flood the run log
    t0 = time.perf_counter()
    s = settings
    s.validate()
    if s.online and online is None:
        raise ValueError(f"objective: {s.objective} trains on prompts with references (OnlineData); none given")
    sft_dir, work_dir, out_dir = Path(sft_dir), Path(work_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pad_id = tokenizer.pad_token_id
    eval_enc, train_records, eval_records, left_out, too_long = encode_splits(tokenizer, train_pairs, eval_pairs, s)

    scores = {name: preference_scores(load_model(path), eval_enc, pad_id) for name, path in (compare or {}).items()}
    torch.manual_seed(s.seed)
    model = load_model(sft_dir)
    scores["lora"] = preference_scores(model, eval_enc, pad_id)
    log({"event": "start", "objective": s.objective, "train_pairs": len(train_records), "eval_pairs": len(eval_records),
         **{f"{k}_accuracy": v.accuracy for k, v in scores.items()}})

    described = {"settings": s.model_dump(), "train": train_records, "eval": eval_records}
    if s.online:
        described.update(chats=[online.train_chats, online.eval_chats], reward_model=str(online.reward_model_dir))
    run_id = hf_training.run_identity(described,
                                      [weights_file(sft_dir)])
    resume_from = hf_training.prepare_work_dir(work_dir, run_id, log)
    if s.online:
        trainer = online_rl.grpo_trainer(s, model, tokenizer, work_dir, online.train_chats, online.eval_chats,
                                         online.reward_model_dir)
    else:
        trainer = preference_methods.build_trainer(s, model, tokenizer, work_dir, train_records, eval_records)
    trained, train_seconds, history = hf_training.fit(trainer, resume_from, log)
    if not hf_training.is_main_process():
        return None  # DDP: every rank holds the same trained adapter; rank 0 alone merges, scores and writes
    planned = hf_training.planned_steps(s, len(online.train_chats) if s.online else len(train_records))
    summary = (hf_training.selection_summary(history, planned, online_rl.SELECTION_METRIC, True, "reward")
               if s.online else hf_training.selection_summary(history, planned))
    best = best_evaluation(history, summary["best_step"])

    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(adapter_dir(tmp))  # the best checkpoint's adapter (load_best_model_at_end)
        merged = adapters.merge_into_fp32(sft_dir, adapter_dir(tmp))
        scores["aligned"] = preference_scores(merged, eval_enc, pad_id)
        save_merged(merged, tokenizer, merged_dir(tmp))
        accuracy = method_accuracy(s, best, scores["aligned"].accuracy,
                                   lambda: kto_implicit_reward_accuracy(merged, load_model(sft_dir), eval_enc, pad_id))
        counts = (len(train_records), len(eval_records), left_out, too_long)
        metrics = align_metrics(s, scores, counts, accuracy, best, summary,
                                {"train_loss": trained.training_loss, "planned_steps": planned,
                                 "epochs": trainer.state.epoch, "train_seconds": train_seconds,
                                 "resumed_from": resume_from or "", "t0": t0})
        (tmp / "preference_scores.json").write_text(json.dumps({n: asdict(v) for n, v in scores.items()}, indent=2))
        hf_training.write_run_files(tmp, metrics.as_dict(), {
            "settings": s.model_dump(), "reference": str(sft_dir), "run_id": run_id,
            "peft_config": adapters.peft_config(s.adapter).to_dict()}, history)
    log({"event": "done", **metrics.as_dict()})
    return AlignResult(metrics, scores, history)


def read_result(out_dir: Path) -> AlignResult:
    """The AlignResult train_align returned, read back from the files it wrote in out_dir."""
    metrics, history = hf_training.read_run_files(Path(out_dir))
    scores = {name: PreferenceScores(**v) for name, v in
              json.loads((Path(out_dir) / "preference_scores.json").read_text()).items()}
    return AlignResult(AlignMetrics.from_dict(metrics, list(scores)), scores, history)
