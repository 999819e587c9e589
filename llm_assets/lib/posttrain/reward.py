r"""A reward model (TRL's `RewardTrainer`): the instruction-tuned model with a scalar head, trained so
that the chosen reply of a preference pair scores higher than the rejected one; and the scoring
functions that judge replies with it (held-out pairwise accuracy, win rate of one model's replies
over another's, GRPO's reward).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.preferences import PreferencePair
    >>> from llm_assets.lib.posttrain.reward import RewardSettings, load_reward_model, reward_scores, train_reward_model, win_rate
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> pairs = [PreferencePair(f"What is {i} + 1?", f"It is {i + 1}.", f"No idea, ask {i}.", f"p#L{i}") for i in range(12)]
    >>> tok = train_tokenizer([p.prompt + p.chosen + p.rejected for p in pairs], vocab_size=300)
    >>> root = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok,
    ...            root / "lora")                  # stands in for lora_checkpoint's merged model
    >>> settings = RewardSettings(max_len=64, epochs=1, batch_size=4, lr=1e-3, eval_every=2, log_every=1)
    >>> events = []
    >>> result = train_reward_model(settings, root / "lora", pairs[:8], pairs[8:], root / "work", root / "out", log=events.append)
    >>> result.metrics.train_pairs, result.metrics.eval_pairs, [e["event"] for e in events][:2], events[-1]["event"]
    (8, 4, ['start', 'train'], 'done')
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['chat_template.jinja', 'config.json', 'held_out_rewards.json', 'log_history.jsonl', 'metrics.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'training_config.json']
    >>> model, tokenizer = load_reward_model(root / "out")     # an AutoModelForSequenceClassification
    >>> scores = reward_scores(model, tokenizer, ["What is 2 + 1?"] * 2, ["It is 3.", "No idea."])
    >>> len(scores), all(isinstance(s, float) for s in scores)
    (2, True)
    >>> win_rate(model, tokenizer, ["Hi?"] * 3, ["Hello.", "Hey.", "Yo."], ["Hello.", "Hey.", "Yo."])  # ties count half
    0.5

Full fine-tune, not LoRA: the scalar head (`score`, d_model -> 1) starts random and has to train
together with the features under it, and at the sizes this project runs (tiny, demo: a few million
parameters) every weight fits in memory with AdamW many times over, so an adapter would save
nothing and add a merge. The saved directory is a plain `AutoModelForSequenceClassification`
model with its tokenizer.

A (prompt, reply) pair is scored as the conversation `prompt messages + [assistant reply]` under the
tokenizer's chat template (`<|user|>...<|end|>\n<|assistant|>reply<|end|>\n`): the rendering TRL's
RewardTrainer trains on and GRPOTrainer scores completions with (`encode_conversation` makes the
same call; the tests check all three agree). The reward is the head's output at the last token.

Held-out pairwise accuracy is measured by `reward_scores` on the saved model (not by TRL's running
metric): the share of held-out pairs whose chosen reply scores strictly higher than the rejected.
A pair with a side longer than `max_len` tokens is truncated as for alignment (chat_data.fit: the
prompt's oldest turns or start, then the replies' ends), as text, since RewardTrainer drops what is
longer; a pair whose frame alone is too long is left out. Both are counted and named.
The schedule (epochs with a step cap, evaluation, best-checkpoint selection on the held-out
pairwise loss, early stopping) is hf_training.ScheduleSettings'; a killed run resumes (hf_training.py).

Run on its own: `python -m llm_assets.lib.posttrain.reward LORA_MERGED_DIR PREFERENCE_DATASET_DIR OUT_DIR`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from pydantic import Field

from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.common.report import figure_markdown, pyplot
from llm_assets.lib.posttrain import hf_training
from llm_assets.lib.posttrain.chat_data import TooLong, fit
from llm_assets.lib.posttrain.preferences import PreferencePair, prompt_messages
from llm_assets.lib.pretrain.model_dir import check_safetensors, device, weights_file


class RewardSettings(hf_training.ScheduleSettings):
    """The reward model: the shared schedule (inherited, flat in a run config; every weight trains,
    so a run config gives it a lower `lr` than an adapter's, e.g. 1e-4 on the demo) plus its own
    fields; the launchpad of `reward_model`."""

    eval_pairs: int = Field(0, description="Held-out pairs scored and evaluated on (0 = all).")
    center_rewards: float = Field(0.01, description="Weight of the mean-zero reward penalty (TRL's "
                                                    "center_rewards_coefficient; 0 = off): keeps rewards near 0 so "
                                                    "runs read alike.")

    def validate(self) -> None:
        hf_training.validate_schedule(self)
        if self.eval_pairs < 0:
            raise ValueError(f"eval_pairs: must be 0 (all) or positive (got {self.eval_pairs})")
        if self.center_rewards < 0:
            raise ValueError(f"center_rewards: must be non-negative (got {self.center_rewards})")


def conversation(prompt: str | list[dict], reply: str) -> list[dict]:
    """A prompt (text or messages ending in a user turn) answered by `reply`."""
    return [*prompt_messages(prompt), {"role": "assistant", "content": reply}]


def encode_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation: the very call TRL's RewardTrainer tokenizes with."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def _longest(tokenizer, p: PreferencePair) -> int:
    return max(len(encode_conversation(tokenizer, conversation(p.prompt, r))) for r in (p.chosen, p.rejected))


def fit_pair(tokenizer, p: PreferencePair, max_len: int) -> PreferencePair | None:
    """`p` with its conversations within max_len tokens: as it is, or truncated (chat_data.fit);
    None when it cannot be. This rendering differs from chat_data's by a token or two (no leading
    eos; a cut reply gets `<|end|>` back), so the budget shrinks by the excess and fit runs again."""
    budget = max_len
    for _ in range(3):
        fitted = fit(tokenizer, prompt_messages(p.prompt), [p.chosen, p.rejected], budget)
        if fitted is None:
            return None
        cut = replace(p, prompt=fitted.prompt, chosen=fitted.replies[0], rejected=fitted.replies[1]) if fitted.truncated else p
        excess = _longest(tokenizer, cut) - max_len
        if excess <= 0:
            return cut
        budget -= excess
    return None


def fitting_pairs(tokenizer, pairs: list[PreferencePair], max_len: int) -> tuple[list[PreferencePair], TooLong]:
    """(the pairs with both conversations within max_len tokens, truncated where needed; those
    truncated or dropped, by source)."""
    kept, too_long = [], TooLong()
    for p in pairs:
        cut = fit_pair(tokenizer, p, max_len)
        if cut is None:
            too_long.dropped.append(p.source)
            continue
        if cut is not p:
            too_long.truncated.append(p.source)
        kept.append(cut)
    return kept, too_long


def trl_records(pairs: list[PreferencePair]) -> list[dict]:
    """TRL's conversational preference format: the prompt as messages, each reply one message."""
    return [{"prompt": prompt_messages(p.prompt),
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]


def load_reward_model(model_dir: Path):
    """(model, tokenizer) of a saved reward model, fp32, in eval mode, on the default device."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_safetensors(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
    if model.config.num_labels != 1 or model.config.pad_token_id is None:
        raise ValueError(f"{model_dir}/config.json: not a reward model (num_labels={model.config.num_labels}, "
                         f"pad_token_id={model.config.pad_token_id}; need 1 and a pad id)")
    return model.to(device()).eval(), AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: Sequence[str | list[dict]], replies: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """The reward of each reply to its prompt (the prompt as the user turn, or its messages), in order."""
    if len(prompts) != len(replies):
        raise ValueError(f"replies: {len(replies)} replies for {len(prompts)} prompts")
    model.eval()
    dev, pad = next(model.parameters()).device, model.config.pad_token_id
    encoded = [encode_conversation(tokenizer, conversation(p, r)) for p, r in zip(prompts, replies)]
    out: list[float] = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(ids) for ids in chunk)
        # right padding: the classifier reads the last non-pad token of each row
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in chunk], device=dev)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk], device=dev)
        out.extend(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())  # (batch,)
    return out


def win_rate(model, tokenizer, prompts: Sequence[str | list[dict]], replies_a: Sequence[str],
             replies_b: Sequence[str]) -> float:
    """Share of prompts where reply a scores higher than reply b; ties count half."""
    if not prompts:
        raise ValueError("prompts: no prompts to compare replies on")
    a = reward_scores(model, tokenizer, prompts, replies_a)
    b = reward_scores(model, tokenizer, prompts, replies_b)
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(prompts)


def pair_rewards(model, tokenizer, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
    """(rewards of the chosen replies, of the rejected replies), pair by pair."""
    prompts = [p.prompt for p in pairs]
    return (reward_scores(model, tokenizer, prompts, [p.chosen for p in pairs]),
            reward_scores(model, tokenizer, prompts, [p.rejected for p in pairs]))


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


@dataclass(frozen=True)
class RewardMetrics:
    """The figures of one run: metrics.json, the "done" log event and the asset's metadata, in this
    order. Rewards and accuracies are on the held-out pairs, by reward_scores."""

    train_pairs: int  # training pairs whose both conversations fit in max_len
    eval_pairs: int  # held-out pairs scored
    dropped_too_long: int  # pairs of both splits left out (a frame over max_len, or held out past eval_pairs)
    truncated_to_fit: int  # pairs of both splits over max_len, cut to fit (chat_data.fit)
    too_long_examples: str  # the first few truncated or dropped, by source
    eval_accuracy: float  # share of held-out pairs with reward(chosen) > reward(rejected), saved model
    eval_accuracy_before: float  # the same for the untrained head on the instruction-tuned model (~0.5)
    mean_chosen_reward: float  # mean reward of the held-out chosen replies
    mean_rejected_reward: float
    mean_margin: float  # mean of chosen minus rejected reward
    best_step: int  # the checkpoint kept (lowest held-out pairwise loss): hf_training.selection_summary
    best_eval_loss: float
    last_eval_loss: float
    stopped_early: bool
    overfitting_from_step: int  # -1: held-out loss never rose while training loss fell
    epochs: float  # passes over the training pairs actually run
    steps: int  # optimizer steps run
    train_loss: float  # the Trainer's mean training loss over the steps this session ran
    train_seconds: float  # time in RewardTrainer.train()
    resumed_from: str  # the Trainer checkpoint this session resumed from; "" = a fresh start
    wall_seconds: float  # all of train_reward_model, scoring and saving included


@dataclass(frozen=True)
class RewardResult:
    """What train_reward_model returns."""

    metrics: RewardMetrics
    chosen_rewards: list[float]  # held-out, pair by pair, by the saved model
    rejected_rewards: list[float]
    history: list[dict]  # the Trainer's log rows with a training "loss" or an "eval_loss" (the loss curve)


def split_pairs(tokenizer, train_pairs: list[PreferencePair], eval_pairs: list[PreferencePair],
                s: RewardSettings) -> tuple[list[PreferencePair], list[PreferencePair], int, TooLong]:
    """(training pairs, held-out pairs, number left out, pairs over max_len): long pairs are
    truncated, those that cannot be are dropped, the held-out ones cut to eval_pairs."""
    train, too_long = fitting_pairs(tokenizer, train_pairs, s.max_len)
    held, held_too_long = fitting_pairs(tokenizer, eval_pairs, s.max_len)
    if not train or not held:
        raise ValueError(f"max_len: no {'training' if not train else 'held-out'} preference pair fits in {s.max_len} tokens")
    held = held[: s.eval_pairs] if s.eval_pairs else held
    too_long += held_too_long
    return train, held, len(train_pairs) - len(train) + len(eval_pairs) - len(held), too_long


def make_trainer(sft_dir: Path, tokenizer, s: RewardSettings, work_dir: Path, train: list[PreferencePair],
                 held: list[PreferencePair]):
    """TRL's RewardTrainer on the instruction-tuned model with a fresh scalar head: TRL loads
    `sft_dir` as AutoModelForSequenceClassification (num_labels=1, seeded head, pad id set)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**hf_training.trainer_arguments(s, work_dir, len(train)),
                          model_init_kwargs={"dtype": torch.float32, "use_safetensors": True},
                          max_length=s.max_len, center_rewards_coefficient=s.center_rewards or None)
    return RewardTrainer(model=str(sft_dir), args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(trl_records(train)),
                         eval_dataset=Dataset.from_list(trl_records(held)),
                         callbacks=hf_training.schedule_callbacks(s))


def save_reward_model(trainer, tokenizer, out: Path) -> None:
    """The model (the best checkpoint, which the Trainer loaded at the end) and its tokenizer; not
    Trainer.save_model, which adds a pickled training_args.bin."""
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_reward_model(settings: RewardSettings, sft_dir: Path, train_pairs: list[PreferencePair],
                       eval_pairs: list[PreferencePair], work_dir: Path, out_dir: Path,
                       log: hf_training.Log = print) -> RewardResult | None:
    """Train a reward model on the instruction-tuned model in `sft_dir` (a merged, plain model),
    write out_dir atomically, and return its figures and held-out rewards (None on the other ranks
    of a DDP run: rank 0 writes and returns)."""
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()  # TRL's tokenization bars would flood the run log
    t0 = time.perf_counter()
    s = settings
    s.validate()
    sft_dir, work_dir, out_dir = Path(sft_dir), Path(work_dir), Path(out_dir)
    check_safetensors(sft_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    train, held, left_out, too_long = split_pairs(tokenizer, train_pairs, eval_pairs, s)

    run = hf_training.run_identity({"settings": s.model_dump(), "train": trl_records(train), "eval": trl_records(held)},
                                   [weights_file(sft_dir)])
    resume_from = hf_training.prepare_work_dir(work_dir, run, log)
    trainer = make_trainer(sft_dir, tokenizer, s, work_dir, train, held)
    accuracy_before = pairwise_accuracy(*pair_rewards(trainer.model, tokenizer, held))
    log({"event": "start", "train_pairs": len(train), "eval_pairs": len(held), "eval_accuracy_before": accuracy_before})
    trained, train_seconds, history = hf_training.fit(trainer, resume_from, log)
    if not hf_training.is_main_process():
        return None  # DDP: every rank holds the same trained model; rank 0 alone scores and writes
    selection = hf_training.selection_summary(history, hf_training.planned_steps(s, len(train)))

    with atomic_dir(out_dir) as tmp:
        save_reward_model(trainer, tokenizer, tmp)
        chosen, rejected = pair_rewards(*load_reward_model(tmp), held)  # the saved model, as users load it
        n = len(held)
        metrics = RewardMetrics(
            train_pairs=len(train), eval_pairs=n, dropped_too_long=left_out,
            truncated_to_fit=len(too_long.truncated), too_long_examples=too_long.examples(),
            eval_accuracy=pairwise_accuracy(chosen, rejected), eval_accuracy_before=accuracy_before,
            mean_chosen_reward=sum(chosen) / n, mean_rejected_reward=sum(rejected) / n,
            mean_margin=sum(c - r for c, r in zip(chosen, rejected)) / n,
            best_step=selection["best_step"], best_eval_loss=selection["best_eval_loss"],
            last_eval_loss=selection["last_eval_loss"], stopped_early=selection["stopped_early"],
            overfitting_from_step=selection["overfitting_from_step"],
            epochs=trainer.state.epoch or 0.0, steps=selection["steps_run"], train_loss=trained.training_loss,
            train_seconds=train_seconds, resumed_from=resume_from or "", wall_seconds=time.perf_counter() - t0)
        (tmp / "held_out_rewards.json").write_text(json.dumps(
            [{"source": p.source, "chosen": c, "rejected": r} for p, c, r in zip(held, chosen, rejected)], indent=1))
        hf_training.write_run_files(tmp, asdict(metrics), {"settings": s.model_dump(), "sft_model": str(sft_dir),
                                                           "run_id": run}, history)
    log({"event": "done", **asdict(metrics)})
    return RewardResult(metrics, chosen, rejected, history)


def read_result(out_dir: Path) -> RewardResult:
    """The RewardResult train_reward_model returned, read back from the files it wrote in out_dir."""
    metrics, history = hf_training.read_run_files(Path(out_dir))
    rows = json.loads((Path(out_dir) / "held_out_rewards.json").read_text())
    return RewardResult(RewardMetrics(**metrics), [r["chosen"] for r in rows], [r["rejected"] for r in rows], history)


def rewards_scatter_markdown(chosen: Sequence[float], rejected: Sequence[float], title: str) -> str:
    """Held-out pairs as points (rejected reward, chosen reward) with the diagonal: points above it
    are pairs the model ranks right. An inline PNG for the asset's metadata."""
    fig, ax = pyplot().subplots(figsize=(5, 5), layout="tight")
    ax.scatter(rejected, chosen, s=12, alpha=0.6, color="#4f6bed")
    lo, hi = min(*chosen, *rejected), max(*chosen, *rejected)
    ax.plot([lo, hi], [lo, hi], ls="--", c="gray", label="chosen = rejected")
    ax.set(xlabel="reward of the rejected reply", ylabel="reward of the chosen reply", title=title)
    ax.legend(loc="upper left")
    return figure_markdown(fig, title)


def main() -> None:
    import argparse

    from llm_assets.lib.posttrain.posttrain_data import read_preferences

    parser = argparse.ArgumentParser(description="Train a reward model on a preference_dataset directory.")
    parser.add_argument("sft_dir", type=Path, help="the instruction-tuned model (lora_checkpoint/merged)")
    parser.add_argument("preference_dataset", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    pairs = {split: read_preferences(args.preference_dataset, split) for split in ("train", "validation")}
    train_reward_model(RewardSettings(), args.sft_dir, pairs["train"], pairs["validation"],
                       args.out_dir.parent / f".work-{args.out_dir.name}", args.out_dir,
                       log=lambda e: print(json.dumps(e)))


if __name__ == "__main__":
    main()
