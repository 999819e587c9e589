"""The offline preference objectives aligned_checkpoint can train, each one TRL trainer: DPO and IPO
(`DPOTrainer`), SimPO (`CPOTrainer`, experimental), ORPO (`ORPOTrainer`, experimental) and KTO
(`KTOTrainer`), all on a fresh LoRA adapter over the instruction-tuned model, with the shared schedule
of hf_training.py.

    >>> from llm_assets.lib.posttrain.preference_methods import OBJECTIVES, method_accuracy, unpaired_records
    >>> OBJECTIVES
    ('dpo', 'ipo', 'simpo', 'orpo', 'kto')
    >>> pair = {"prompt": [{"role": "user", "content": "2 + 2?"}],
    ...         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    >>> sorted((r["completion"][0]["content"], r["label"]) for r in unpaired_records([pair], seed=0))  # KTO's
    [('4', True), ('5', False)]
    >>> method_accuracy("dpo", {"step": 40, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75})
    (0.75, 'eval_rewards/accuracies')

What each objective optimizes (y+ the chosen reply, y- the rejected one, pi the policy, ref the
instruction-tuned model the adapter starts from; log-probabilities summed over the reply):
- `dpo`:   -log sigmoid(beta * [(log pi - log ref)(y+) - (log pi - log ref)(y-)]), plus `sft_weight`
           times the NLL of y+ (TRL's `loss_type=["sigmoid", "sft"]`): the NLL term keeps the policy
           fluent while DPO pushes the two replies apart.
- `ipo`:   the same log-ratio difference, per token, regressed onto 1 / (2 beta) (squared loss), which
           does not drive the margin to infinity on pairs it already ranks; `sft_weight` as for DPO.
- `simpo`: reference-free: -log sigmoid(beta * [mean log pi(y+) - mean log pi(y-)] - gamma), per-token
           means; `sft_weight` is CPO's behaviour-cloning term (`cpo_alpha`, NLL of y+).
- `orpo`:  reference-free: NLL of y+ minus beta (the paper's lambda) times log sigmoid of the log odds
           ratio of y+ over y-; the NLL term is built in (weight 1), `sft_weight` does not apply.
- `kto`:   unpaired: each pair becomes a desirable example (y+) and an undesirable one (y-), each
           pushed above or below a KL baseline (Kahneman-Tversky value function); no SFT term.

DPO, IPO and KTO need the reference: the policy with its adapter switched off (TRL does this when
given `peft_config`; no second copy of the weights). SimPO and ORPO need none and step faster.

`method_accuracy` is the objective's own held-out accuracy, read from what TRL logs at the best
evaluation: DPO and IPO the implicit-reward accuracy (beta * log-ratio against the reference), SimPO
and ORPO the per-token log-probability accuracy of the policy alone. KTOTrainer logs no pairwise
accuracy (its examples are unpaired), so for KTO the caller computes the implicit-reward accuracy on
the held-out pairs (`kto_implicit_reward_accuracy` in align.py).
"""

from __future__ import annotations

import random
from pathlib import Path

from llm_assets.lib.posttrain import adapters, hf_training

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")
USUAL_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}  # TRL's defaults; SimPO's paper's 2
ACCURACY_KEY = "eval_rewards/accuracies"  # what DPOTrainer, CPOTrainer and ORPOTrainer log at an evaluation
KTO_ACCURACY = "implicit reward accuracy on held-out pairs (computed here: KTOTrainer logs no pairwise accuracy)"


def _datasets(train_records: list[dict], eval_records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(train_records), Dataset.from_list(eval_records)


def dpo_trainer(s, model, tokenizer, work_dir: Path, train_records: list[dict], eval_records: list[dict]):
    """DPOTrainer for `dpo` (sigmoid loss) and `ipo`, each plus the SFT term when sft_weight > 0."""
    from trl import DPOConfig, DPOTrainer

    loss = "sigmoid" if s.objective == "dpo" else "ipo"
    losses, weights = ([loss, "sft"], [1.0, s.sft_weight]) if s.sft_weight > 0 else ([loss], [1.0])
    config = DPOConfig(**hf_training.trainer_arguments(s, work_dir, len(train_records)), beta=s.objective_beta,
                       max_length=s.max_len, loss_type=losses, loss_weights=weights)
    train, held = _datasets(train_records, eval_records)
    return DPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=train, eval_dataset=held,
                      peft_config=adapters.peft_config(s.adapter), callbacks=hf_training.schedule_callbacks(s))


def simpo_trainer(s, model, tokenizer, work_dir: Path, train_records: list[dict], eval_records: list[dict]):
    """CPOTrainer with loss_type="simpo" (SimPO); cpo_alpha = sft_weight (0 = plain SimPO)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = CPOConfig(**hf_training.trainer_arguments(s, work_dir, len(train_records)), beta=s.objective_beta,
                       max_length=s.max_len, loss_type="simpo", cpo_alpha=s.sft_weight)
    train, held = _datasets(train_records, eval_records)
    return CPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=train, eval_dataset=held,
                      peft_config=adapters.peft_config(s.adapter), callbacks=hf_training.schedule_callbacks(s))


def orpo_trainer(s, model, tokenizer, work_dir: Path, train_records: list[dict], eval_records: list[dict]):
    """ORPOTrainer; beta is the paper's lambda, the weight of the odds-ratio term beside the NLL."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config = ORPOConfig(**hf_training.trainer_arguments(s, work_dir, len(train_records)), beta=s.objective_beta,
                        max_length=s.max_len)
    train, held = _datasets(train_records, eval_records)
    return ORPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=train, eval_dataset=held,
                       peft_config=adapters.peft_config(s.adapter), callbacks=hf_training.schedule_callbacks(s))


def unpaired_records(records: list[dict], seed: int) -> list[dict]:
    """KTO's examples: per pair a desirable (chosen, label True) and an undesirable (rejected, label
    False) one, shuffled. KTOTrainer reads its data in order (its KL baseline pairs each example
    with its neighbour's completion), so the shuffle is what keeps a batch from holding one label
    only, or a neighbour from being the same prompt's other reply."""
    out = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
           for r in records for side in ("chosen", "rejected")]
    random.Random(seed).shuffle(out)
    return out


def kto_trainer(s, model, tokenizer, work_dir: Path, train_records: list[dict], eval_records: list[dict]):
    """KTOTrainer on the unpaired examples; a step takes batch_size pairs' worth (2 x batch_size
    examples), so epochs and steps mean what they mean for the paired objectives."""
    from trl import KTOConfig, KTOTrainer

    arguments = hf_training.trainer_arguments(s, work_dir, len(train_records))
    arguments.update(per_device_train_batch_size=2 * s.batch_size, per_device_eval_batch_size=2 * s.batch_size)
    config = KTOConfig(**arguments, beta=s.objective_beta, max_length=s.max_len)
    train, held = _datasets(unpaired_records(train_records, s.seed), unpaired_records(eval_records, s.seed))
    return KTOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=train, eval_dataset=held,
                      peft_config=adapters.peft_config(s.adapter), callbacks=hf_training.schedule_callbacks(s))


def build_trainer(s, model, tokenizer, work_dir: Path, train_records: list[dict], eval_records: list[dict]):
    """The TRL trainer of `s.objective` on TRL's conversational preference records (trl_records)."""
    build = {"dpo": dpo_trainer, "ipo": dpo_trainer, "simpo": simpo_trainer, "orpo": orpo_trainer,
             "kto": kto_trainer}[s.objective]
    return build(s, model, tokenizer, work_dir, train_records, eval_records)


def method_accuracy(objective: str, best_eval: dict) -> tuple[float, str]:
    """(the objective's held-out accuracy at the best evaluation, the TRL key it was read from);
    raises for KTO, whose trainer logs none (align.py computes it), and when the key is missing."""
    if objective == "kto":
        raise ValueError("objective: KTOTrainer logs no pairwise accuracy; compute the implicit-reward accuracy")
    if ACCURACY_KEY not in best_eval:
        raise ValueError(f"{objective}: the evaluation at step {best_eval.get('step')} logged no {ACCURACY_KEY} "
                         f"(keys: {sorted(best_eval)})")
    return best_eval[ACCURACY_KEY], ACCURACY_KEY
