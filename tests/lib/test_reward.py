"""The reward model on a tiny model (TRL's RewardTrainer on CPU) and the scoring functions built on it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llm_assets.lib.posttrain.preferences import PreferencePair
from llm_assets.lib.posttrain.reward import (RewardSettings, conversation, encode_conversation, fitting_pairs,
                                             load_reward_model, make_trainer, read_result, reward_scores,
                                             rewards_scatter_markdown, train_reward_model, win_rate)

# Learnable: the chosen reply always answers the question, the rejected one never does.
PAIRS = [PreferencePair(f"Explain what `mod.f{i}(x)` does.", f"Return x plus {i}.",
                        f"Open the file number {i} for writing.", f"m.py::f{i}") for i in range(48)]
SETTINGS = dict(max_len=128, epochs=8, batch_size=8, lr=1e-3, warmup_ratio=0.0, eval_every=8, log_every=4,
                precision="fp32")


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    result = train_reward_model(RewardSettings(**SETTINGS), tiny_base_dir, PAIRS[:32], PAIRS[32:], root / "work",
                                root / "out", log=lambda e: None)
    return result, root / "out"


def test_the_reward_model_ranks_held_out_chosen_replies_first(trained):
    result, out = trained
    m = result.metrics
    assert m.train_pairs == 32 and m.eval_pairs == 16 and m.dropped_too_long == 0 and m.truncated_to_fit == 0
    assert m.steps == 32  # 8 epochs of 32 pairs at 8 a step
    assert m.eval_accuracy >= 0.8 and m.mean_chosen_reward > m.mean_rejected_reward
    # -log sigmoid(0) = ln 2 is the pairwise loss of a model that cannot tell the replies apart
    assert m.best_eval_loss < 0.5 * math.log(2)
    assert m.mean_margin == pytest.approx(m.mean_chosen_reward - m.mean_rejected_reward)
    # the figures come from the saved model, as a user loads it
    model, tok = load_reward_model(out)
    prompts = [p.prompt for p in PAIRS[32:]]
    assert reward_scores(model, tok, prompts, [p.chosen for p in PAIRS[32:]]) == pytest.approx(result.chosen_rewards, abs=1e-5)
    assert win_rate(model, tok, prompts, [p.chosen for p in PAIRS[32:]], [p.rejected for p in PAIRS[32:]]) == m.eval_accuracy
    assert m.best_step in [r["step"] for r in result.history if "eval_loss" in r]


def test_the_output_is_a_plain_sequence_classifier_with_its_run_files(trained, tiny_base_dir):
    result, out = trained
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == AutoTokenizer.from_pretrained(out).pad_token_id
    assert not (out / "training_args.bin").exists()  # no pickle in the artifact
    flat = json.loads((out / "metrics.json").read_text())
    assert flat["eval_accuracy"] == result.metrics.eval_accuracy
    held = json.loads((out / "held_out_rewards.json").read_text())
    assert [r["source"] for r in held] == [p.source for p in PAIRS[32:]]
    assert (out / "log_history.jsonl").read_text().count("\n") == len(result.history)
    assert read_result(out) == result  # what the asset reads back after a torchrun run
    # a full fine-tune: the head is new and the body moved too
    trained_w, base_w = load_file(out / "model.safetensors"), load_file(tiny_base_dir / "model.safetensors")
    assert "score.weight" in trained_w and "score.weight" not in base_w
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(trained_w[name], base_w[name])


def test_training_scoring_and_grpo_see_the_same_token_ids(trained, tiny_base_dir, tmp_path):
    _, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    pair = PAIRS[0]
    ids = encode_conversation(tok, conversation(pair.prompt, pair.chosen))
    trainer = make_trainer(tiny_base_dir, tok, RewardSettings(**SETTINGS), tmp_path, PAIRS[:8], PAIRS[8:16])
    assert trainer.train_dataset[0]["chosen_ids"] == ids  # what RewardTrainer trains on
    # GRPOTrainer renders prompt + completion as text, then tokenizes it without special tokens
    text = tok.apply_chat_template(conversation(pair.prompt, pair.chosen), tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids).endswith(f"<|assistant|>{pair.chosen}<|end|>\n")


def test_scores_do_not_depend_on_batching_or_padding(trained):
    _, out = trained
    model, tok = load_reward_model(out)
    prompts = ["Hi?", "Explain what `mod.f1(x)` does, in detail please."]
    replies = ["A much longer reply than the other one, with many tokens.", "Ok."]
    together = reward_scores(model, tok, prompts, replies, batch_size=2)
    alone = [reward_scores(model, tok, [p], [r])[0] for p, r in zip(prompts, replies)]
    assert together == pytest.approx(alone, abs=1e-5)


def test_win_rate_of_a_set_against_itself_is_a_half_and_swapping_sides_complements(trained):
    _, out = trained
    model, tok = load_reward_model(out)
    prompts, a, b = [p.prompt for p in PAIRS[:6]], [p.chosen for p in PAIRS[:6]], [p.rejected for p in PAIRS[:6]]
    assert win_rate(model, tok, prompts, a, a) == 0.5
    assert win_rate(model, tok, prompts, a, b) + win_rate(model, tok, prompts, b, a) == pytest.approx(1.0)


def test_the_scatter_plot_is_an_inline_png():
    assert rewards_scatter_markdown([1.0, 2.0], [0.5, 2.5], "rewards").startswith("![rewards](data:image/png;base64,")


def test_bad_settings_and_inputs_fail_naming_the_field(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="eval_pairs"):
        RewardSettings(eval_pairs=-1).validate()
    with pytest.raises(ValueError, match="center_rewards"):
        RewardSettings(center_rewards=-0.1).validate()
    with pytest.raises(ValueError, match="max_len"):
        train_reward_model(RewardSettings(**{**SETTINGS, "max_len": 8}), tiny_base_dir, PAIRS[:4], PAIRS[4:6],
                           tmp_path / "work", tmp_path / "out", log=lambda e: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="replies"):
        reward_scores(None, None, ["a", "b"], ["only one"])


def test_long_pairs_are_cut_to_fit_the_reward_trainer(tiny_base_dir):
    """RewardTrainer drops conversations over max_length: fitting_pairs cuts them to fit instead."""
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    words = " ".join(f"word{i}" for i in range(150))
    pairs = [PAIRS[0], PreferencePair(words, "Yes.", words, "hh.jsonl#L7")]  # a long prompt and a long reply
    kept, too_long = fitting_pairs(tok, pairs, 96)
    assert kept[0] is PAIRS[0] and too_long.truncated == ["hh.jsonl#L7"] and too_long.dropped == []
    cut = kept[1]
    assert cut.chosen == "Yes." and words.startswith(cut.rejected) and words.endswith(cut.prompt[-1]["content"])
    assert max(len(encode_conversation(tok, conversation(cut.prompt, r))) for r in (cut.chosen, cut.rejected)) <= 96
