"""Online RL for aligned_checkpoint: GRPO (TRL's `GRPOTrainer`) samples `num_generations` replies
per training prompt from the policy, scores each with the rewards below, and raises the
log-probability of the replies that beat their group's mean, with a KL term (`beta`) against the
instruction-tuned model the fresh adapter starts from.

The reward of a reply is a weighted sum:
- `rouge_weight` x ROUGE-L F1 against the prompt's reference reply (the chat's own answer: a
  verifiable reward, the same scorer as eval_report's);
- `reward_model_weight` x the score of reward_model (the classifier trained on preference_dataset).

The checkpoint kept is the one of the highest mean reward on held-out prompts (TUNING half of the
validation chats: eval_report tests on the other half), evaluated every `eval_every` steps.

    >>> from llm_assets.lib.posttrain.online_rl import reward_texts, rouge_reward
    >>> reward_texts([[{"role": "assistant", "content": "Return the sum."}], "plain text"])
    ['Return the sum.', 'plain text']
    >>> [round(r, 2) for r in rouge_reward([[{"role": "assistant", "content": "Return the sum."}]],
    ...                                    reference=["Return the sum of a and b."])]
    [0.6]

Measured on the demo (LoRA model ROUGE-L 0.153 plain greedy on 128 held-out prompts, 8 prompts x 8
replies a step): ROUGE-L alone, temperature 0.3, lr 5e-4, 30-40 steps: aligned / LoRA 1.006-1.02;
temperature 0.5-1.0 or lr 2e-3 lowered it (0.61-0.90); with the reward model at weight 0.1 the
reward-model score rose and ROUGE-L fell to 0.90x: the replies collapsed to "Return the file.",
which the reward model scores high (it is exploitable at this scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from llm_assets.lib.posttrain import adapters, hf_training
from llm_assets.lib.posttrain.generation import rouge_l_scores

SELECTION_METRIC = "eval_reward"  # what GRPOTrainer logs at an evaluation: the held-out mean reward


def reward_texts(completions: Sequence) -> list[str]:
    """The reply text of each completion TRL passes a reward function (a conversational completion
    is a list of one assistant message)."""
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


def rouge_reward(completions: Sequence, reference: Sequence[str], **_) -> list[float]:
    """ROUGE-L F1 of each reply against its prompt's reference (the `reference` column)."""
    return rouge_l_scores(reward_texts(completions), list(reference))


def reward_model_reward(model_dir: Path):
    """A TRL reward function scoring each reply with the reward model saved in `model_dir`."""
    from llm_assets.lib.posttrain import reward

    model, tokenizer = reward.load_reward_model(model_dir)

    def reward_model(prompts: Sequence, completions: Sequence, **_) -> list[float]:
        with torch.no_grad():
            return reward.reward_scores(model, tokenizer, list(prompts), reward_texts(completions), batch_size=64)

    return reward_model


def prompt_records(chats: list[list[dict]]) -> list[dict]:
    """GRPO's dataset: each chat's prompt (its messages before the final reply) and that reply as
    the reference."""
    return [{"prompt": chat[:-1], "reference": chat[-1]["content"]} for chat in chats]


def grpo_trainer(s, model, tokenizer, work_dir: Path, train_chats: list[list[dict]], eval_chats: list[list[dict]],
                 reward_model_dir: Path | None):
    """GRPOTrainer on a fresh adapter (`s.adapter`) over `model`; the reference for the KL term is
    `model` with the adapter switched off. A step takes `s.batch_size` prompts x num_generations replies."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    funcs, weights = [rouge_reward], [s.rouge_weight]
    if s.reward_model_weight:
        if reward_model_dir is None:
            raise ValueError("reward_model_weight: > 0 needs the reward model's directory")
        funcs.append(reward_model_reward(reward_model_dir))
        weights.append(s.reward_model_weight)
    arguments = hf_training.trainer_arguments(s, work_dir, len(train_chats))
    per_device = hf_training.per_device_batch(s.batch_size) * s.num_generations  # replies, this process's share
    arguments.update(per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
                     metric_for_best_model=SELECTION_METRIC, greater_is_better=True)
    config = GRPOConfig(**arguments, beta=s.objective_beta, num_generations=s.num_generations,
                        temperature=s.temperature, max_completion_length=s.max_completion_length,
                        reward_weights=weights)
    return GRPOTrainer(model=model, reward_funcs=funcs, args=config, processing_class=tokenizer,
                       train_dataset=Dataset.from_list(prompt_records(train_chats)),
                       eval_dataset=Dataset.from_list(prompt_records(eval_chats)),
                       peft_config=adapters.peft_config(s.adapter), callbacks=hf_training.schedule_callbacks(s))
