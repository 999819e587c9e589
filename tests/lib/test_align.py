"""Alignment mechanics on a tiny model (TRL's trainers on CPU: DPO, IPO, SimPO, ORPO, KTO) and the
preference accuracy rule."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.posttrain.align import (AlignSettings, encode_pairs, encode_splits, preference_scores, prompt_messages,
                                            read_result, train_align)
from llm_assets.lib.posttrain.preferences import PreferencePair

# Learnable: every chosen reply follows one pattern ("Return x plus i."), every rejected one breaks it.
PAIRS = [PreferencePair(f"Explain what `mod.f{i}(x)` does.", f"Return x plus {i}.", f"Open the file number {i} for writing.",
                        f"m.py::f{i}") for i in range(24)]


def test_prompt_messages_of_every_prompt_form():
    assert prompt_messages("Hi?") == [{"role": "user", "content": "Hi?"}]
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompt_messages(chat) == chat
    hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant:"
    assert prompt_messages(hh) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "Help me?"}]


def test_accuracy_compares_mean_log_prob_per_token(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = load_model(tiny_base_dir)
    pairs = [PreferencePair("Q?", "a b c d e f g h", "a", "x"), PreferencePair("Q?", "a", "a b c d e f g h", "y")]
    encoded, kept, too_long = encode_pairs(tok, pairs, 128)
    assert kept == pairs and too_long.examples() == "truncated 0; dropped 0"
    s = preference_scores(model, encoded, tok.pad_token_id)
    # the two pairs are mirror images: exactly one of them is won, by either rule
    assert s.accuracy == 0.5 and s.accuracy_summed == 0.5
    assert s.logp_margin == pytest.approx(0.0, abs=1e-4)


def _hh_pair(i: int, turns: int) -> PreferencePair:
    """An HH-RLHF prompt of `turns` exchanges (the text form preference_dataset reads) and two replies."""
    dialogue = "".join(f"\n\nHuman: Question {t} about item {i} and its many parts?\n\nAssistant: An answer {t} "
                       f"about item {i} with some words." for t in range(turns))
    return PreferencePair(dialogue + "\n\nHuman: And finally?\n\nAssistant:", f"Finally {i}.", f"No {i}.", f"hh.jsonl#L{i}")


def test_long_dialogues_are_truncated_once_for_both_sides_and_trl_gets_the_cut_prompt(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    pairs = [_hh_pair(i, turns=12 if i % 2 else 1) for i in range(6)]  # odd ones run far past 128 tokens
    s = settings(max_len=128)
    eval_enc, train_records, eval_records, left_out, too_long = encode_splits(tok, pairs[:4], pairs[4:], s)
    assert left_out == 0 and too_long.truncated == ["hh.jsonl#L1", "hh.jsonl#L3", "hh.jsonl#L5"]
    assert too_long.dropped == [] and len(train_records) == 4 and len(eval_enc) == 2
    for pair, record in zip(pairs[:4], train_records):
        full = prompt_messages(pair.prompt)
        assert record["prompt"][-1] == full[-1] and record["prompt"] == full[len(full) - len(record["prompt"]):]
        assert record["chosen"][0]["content"] == pair.chosen  # replies whole: they fit once the oldest turns went
        text = tok.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 128  # TRL's own tokenization fits too
    for chosen, rejected in eval_enc:
        n = sum(label == -100 for label in chosen["labels"])
        assert chosen["input_ids"][:n] == rejected["input_ids"][:n] and len(chosen["input_ids"]) <= 128


def settings(**kw) -> AlignSettings:
    base = dict(r=4, alpha=8, dropout=0.0, max_len=128, epochs=1.0, batch_size=4, lr=5e-3, warmup_ratio=0.0,
                eval_every=2, eval_pairs=8, log_every=1)  # 16 training pairs: 4 steps
    return AlignSettings(**{**base, **kw})


def test_dpo_with_sft_term_trains_a_new_adapter_on_the_reference_and_merges(tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    result = train_align(settings(), tiny_base_dir, PAIRS[:16], PAIRS[16:], tmp_path / "work", out,
                         log=lambda e: None, compare={"base": tiny_base_dir})
    m = result.metrics
    assert (m.objective, m.beta, m.sft_weight) == ("dpo", 0.1, 1.0)  # the default: DPO plus the SFT term
    assert set(result.scores) == {"base", "lora", "aligned"}
    # here the "LoRA model" (the reference) is the base itself: the same scores
    assert result.scores["base"] == result.scores["lora"]
    assert m.train_pairs == 16 and m.eval_pairs == 8 and m.planned_steps == m.steps_run == 4
    assert m.eval_reward_margin == m.eval_reward_margin  # computed, not NaN
    evals = {r["step"]: r for r in result.history if "eval_loss" in r}
    assert sorted(evals) == [2, 4] and m.best_eval_loss == min(r["eval_loss"] for r in evals.values())
    assert m.method_accuracy == evals[m.best_step]["eval_rewards/accuracies"]  # of the checkpoint kept
    assert m.method_accuracy_source == "eval_rewards/accuracies"
    # the flat figures (metrics.json, the asset's metadata) spread the per-model ones
    flat = json.loads((out / "metrics.json").read_text())
    assert list(flat)[5:8] == ["dropped_too_long", "truncated_to_fit", "too_long_examples"]
    assert flat["truncated_to_fit"] == 0 and flat["too_long_examples"] == "truncated 0; dropped 0"
    assert list(flat)[8:14] == ["base_preference_accuracy", "lora_preference_accuracy", "aligned_preference_accuracy",
                                "base_preference_accuracy_summed", "lora_preference_accuracy_summed",
                                "aligned_preference_accuracy_summed"]
    assert flat["aligned_preference_accuracy"] == result.scores["aligned"].accuracy
    assert json.dumps(flat) == json.dumps(m.as_dict())  # same keys, order and values (NaN too)
    assert read_result(out) == result  # what the asset reads back after a torchrun run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    ref = load_file(tiny_base_dir / "model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    assert torch.equal(merged["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(merged["model.layers.1.mlp.down_proj.weight"], ref["model.layers.1.mlp.down_proj.weight"])
    assert not (tmp_path / "work" / "trainer" / "checkpoint-4" / "ref").exists()  # no copied reference adapter
    # the SFT term is in the loss: the same run without it logs a lower held-out loss at the first evaluation
    plain = train_align(settings(sft_weight=0.0, epochs=0.5), tiny_base_dir, PAIRS[:16], PAIRS[16:],
                        tmp_path / "work-plain", tmp_path / "out-plain", log=lambda e: None)
    assert plain.history[-1]["eval_loss"] < evals[2]["eval_loss"]


@pytest.mark.parametrize("objective, source", [
    ("dpo", "eval_rewards/accuracies"), ("ipo", "eval_rewards/accuracies"), ("simpo", "eval_rewards/accuracies"),
    ("orpo", "eval_rewards/accuracies"), ("kto", "implicit reward accuracy"),
])
def test_every_objective_trains_the_adapter_and_raises_held_out_accuracy(tiny_base_dir, tmp_path, objective, source):
    out = tmp_path / "out"
    result = train_align(settings(objective=objective, sft_weight=0.0, epochs=0.5), tiny_base_dir, PAIRS[:16],
                         PAIRS[16:], tmp_path / "work", out, log=lambda e: None)
    m = result.metrics
    assert m.objective == objective and m.steps_run == 2
    # the adapter trained: lora_B starts at zero, every one of them moved
    lora_b = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b)
    # the fixture is learnable: the aligned model prefers the chosen replies more often than the LoRA model
    assert m.preference_accuracy["aligned"] > m.preference_accuracy["lora"]
    assert 0 <= m.method_accuracy <= 1 and m.method_accuracy_source.startswith(source)


def test_align_settings_fail_loudly():
    for change, field in (({"beta": -0.1}, "beta"), ({"method": "qlora"}, "method"), ({"objective": "ppo"}, "objective"),
                          ({"sft_weight": -1.0}, "sft_weight"), ({"eval_pairs": -1}, "eval_pairs"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            AlignSettings(**change).validate()
    assert AlignSettings(objective="simpo").objective_beta == 2.0 and AlignSettings(beta=0.3).objective_beta == 0.3

