"""GRPO on a tiny model (TRL's GRPOTrainer on CPU): sampled replies, the ROUGE-L reward, the
checkpoint of the best held-out reward, and what online RL needs."""

import pytest
from safetensors.torch import load_file

from llm_assets.lib.posttrain.align import AlignSettings, OnlineData, train_align
from llm_assets.lib.posttrain.online_rl import prompt_records, rouge_reward
from llm_assets.lib.posttrain.preferences import PreferencePair

PAIRS = [PreferencePair(f"Explain what `mod.f{i}(x)` does.", f"Return x plus {i}.", f"Open the file number {i} for writing.",
                        f"m.py::f{i}") for i in range(24)]
CHATS = [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.chosen}] for p in PAIRS]


def settings(**kw) -> AlignSettings:
    base = dict(objective="grpo", r=4, alpha=8, dropout=0.0, max_len=128, batch_size=2, num_generations=4,
                max_completion_length=8, temperature=1.0, reward_model_weight=0.0, epochs=1.0, max_steps=4,
                lr=1e-2, warmup_ratio=0.0, eval_every=2, eval_pairs=8, log_every=1)
    return AlignSettings(**{**base, **kw})


def test_prompt_records_and_the_rouge_reward():
    assert prompt_records(CHATS[:1]) == [{"prompt": CHATS[0][:1], "reference": "Return x plus 0."}]
    replies = [[{"role": "assistant", "content": "Return x plus 0."}], [{"role": "assistant", "content": "No."}]]
    assert rouge_reward(replies, reference=["Return x plus 0.", "Return x plus 0."]) == [1.0, 0.0]


def test_grpo_samples_rewards_and_trains_the_adapter(tiny_base_dir, tmp_path):
    """Online RL on the tiny model: GRPO samples groups of replies to prompts with references, is
    rewarded by ROUGE-L, trains a fresh adapter and keeps the checkpoint of the best held-out reward."""
    out = tmp_path / "out"
    result = train_align(settings(), tiny_base_dir, PAIRS[:16], PAIRS[16:], tmp_path / "work", out, log=lambda e: None,
                         online=OnlineData(CHATS[:16], CHATS[16:20], None))
    m = result.metrics
    assert m.objective == "grpo" and m.beta == 0.04 and m.steps_run == m.planned_steps == 4
    rewards = [r for r in result.history if "reward" in r]
    assert rewards and all(0 <= r["reward"] <= 1 for r in rewards)  # ROUGE-L of sampled replies
    evals = {r["step"]: r["eval_reward"] for r in result.history if "eval_reward" in r}
    assert sorted(evals) == [2, 4] and m.best_eval_loss == max(evals.values())  # the best held-out reward kept
    lora_b = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert m.method_accuracy == m.preference_accuracy["aligned"] and m.method_accuracy_source.startswith("reference-free")


def test_grpo_needs_its_prompts(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="prompts with references"):
        train_align(settings(), tiny_base_dir, PAIRS[:16], PAIRS[16:], tmp_path / "w", tmp_path / "o")


def test_grpo_settings_fail_loudly():
    for bad in (dict(num_generations=1), dict(temperature=0.0), dict(reward_model_weight=-1.0)):
        with pytest.raises(ValueError, match="grpo:"):
            settings(**bad).validate()
