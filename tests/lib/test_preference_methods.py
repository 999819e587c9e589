"""The preference objectives as TRL trainers: what each is configured with, KTO's unpaired examples,
and where each objective's own accuracy comes from. (Training runs of every objective: test_align.py.)"""

import pytest
from transformers import AutoTokenizer

from llm_assets.lib.posttrain.align import AlignSettings, trl_records
from llm_assets.lib.posttrain.preference_methods import (ACCURACY_KEY, OBJECTIVES, build_trainer, method_accuracy,
                                                         unpaired_records)
from llm_assets.lib.posttrain.preferences import PreferencePair
from llm_assets.lib.pretrain.model_dir import load_model

PAIRS = [PreferencePair(f"Explain f{i}.", f"Return {i}.", f"Open file {i}.", f"m.py::f{i}") for i in range(8)]


def test_kto_gets_one_desirable_and_one_undesirable_example_per_pair_shuffled():
    records = trl_records(PAIRS)
    unpaired = unpaired_records(records, seed=0)
    assert len(unpaired) == 2 * len(records)
    assert sorted((r["completion"][0]["content"], r["label"]) for r in unpaired) == sorted(
        [(p.chosen, True) for p in PAIRS] + [(p.rejected, False) for p in PAIRS])
    replies = {p.prompt: (p.chosen, p.rejected) for p in PAIRS}
    assert all(r["completion"][0]["content"] in replies[r["prompt"][0]["content"]] for r in unpaired)  # its own prompt
    labels = [r["label"] for r in unpaired]
    assert labels != [True, False] * len(records) and labels != sorted(labels)  # neither interleaved nor grouped
    assert unpaired == unpaired_records(records, seed=0) != unpaired_records(records, seed=1)


@pytest.mark.parametrize("objective, trainer_class, loss", [
    ("dpo", "DPOTrainer", ["sigmoid", "sft"]), ("ipo", "DPOTrainer", ["ipo", "sft"]),
    ("simpo", "CPOTrainer", "simpo"), ("orpo", "ORPOTrainer", None), ("kto", "KTOTrainer", "kto"),
])
def test_each_objective_is_its_trl_trainer_with_the_shared_schedule(tiny_base_dir, tmp_path, objective, trainer_class,
                                                                    loss):
    s = AlignSettings(objective=objective, r=4, alpha=8, max_len=64, epochs=2.0, batch_size=4, eval_every=2,
                      sft_weight=0.5, precision="fp32")
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    trainer = build_trainer(s, load_model(tiny_base_dir), tok, tmp_path, trl_records(PAIRS), trl_records(PAIRS[:4]))
    args = trainer.args
    assert type(trainer).__name__ == trainer_class and args.max_steps == 4  # 2 epochs x 8 pairs / 4
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and args.eval_steps == 2
    assert args.beta == s.objective_beta
    if loss is not None:
        assert args.loss_type == loss
    if objective in ("dpo", "ipo"):
        assert args.loss_weights == [1.0, 0.5]  # the SFT term's weight
    if objective == "simpo":
        assert args.cpo_alpha == 0.5
    if objective == "kto":  # a step takes batch_size pairs: twice as many unpaired examples
        assert args.per_device_train_batch_size == 8 and len(trainer.train_dataset) == 16
    assert trainer.model.peft_config["default"].r == 4  # a fresh LoRA adapter on the given model


def test_method_accuracy_reads_the_trainers_key_and_fails_loudly():
    assert method_accuracy("orpo", {"step": 4, "eval_loss": 1.0, ACCURACY_KEY: 0.625}) == (0.625, ACCURACY_KEY)
    with pytest.raises(ValueError, match="step 4 logged no"):
        method_accuracy("dpo", {"step": 4, "eval_loss": 1.0})
    with pytest.raises(ValueError, match="KTOTrainer logs no"):
        method_accuracy("kto", {"step": 4, ACCURACY_KEY: 0.5})
    assert set(OBJECTIVES) == {"dpo", "ipo", "simpo", "orpo", "kto"}
