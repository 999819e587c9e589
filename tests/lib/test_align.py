"""DPO mechanics on a tiny model (TRL's DPOTrainer on CPU) and the preference accuracy rule."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.posttrain.align import DpoSettings, encode_pairs, preference_scores, prompt_messages, train_dpo
from llm_assets.lib.posttrain.preferences import PreferencePair

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
    encoded, kept = encode_pairs(tok, pairs, 128)
    assert kept == [0, 1]
    s = preference_scores(model, encoded, tok.pad_token_id)
    # the two pairs are mirror images: exactly one of them is won, by either rule
    assert s.accuracy == 0.5 and s.accuracy_summed == 0.5
    assert s.logp_margin == pytest.approx(0.0, abs=1e-4)


def test_dpo_trains_a_new_adapter_on_the_reference_and_merges(tiny_base_dir, tmp_path):
    settings = DpoSettings(r=4, alpha=8, dropout=0.0, max_len=128, max_steps=4, batch_size=4,
                           lr=5e-3, warmup_steps=0, eval_every=2, eval_pairs=8, save_every=2, log_every=1)
    out = tmp_path / "out"
    result = train_dpo(settings, tiny_base_dir, PAIRS[:16], PAIRS[16:], tmp_path / "work", out,
                       log=lambda e: None, compare={"base": tiny_base_dir})
    m = result.metrics
    assert set(result.scores) == {"base", "lora", "aligned"}
    # here the "LoRA model" (the reference) is the base itself: the same scores
    assert result.scores["base"] == result.scores["lora"]
    assert m.train_pairs == 16 and m.eval_pairs == 8
    assert m.eval_reward_margin == m.eval_reward_margin  # computed, not NaN
    assert any("eval_loss" in r for r in result.history)
    # the flat figures (metrics.json, the asset's metadata) spread the per-model ones
    flat = json.loads((out / "metrics.json").read_text())
    assert list(flat)[4:10] == ["base_preference_accuracy", "lora_preference_accuracy", "aligned_preference_accuracy",
                                "base_preference_accuracy_summed", "lora_preference_accuracy_summed",
                                "aligned_preference_accuracy_summed"]
    assert flat["aligned_preference_accuracy"] == result.scores["aligned"].accuracy
    assert json.dumps(flat) == json.dumps(m.as_dict())  # same keys, order and values (NaN too)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    ref = load_file(tiny_base_dir / "model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    assert torch.equal(merged["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(merged["model.layers.1.mlp.down_proj.weight"], ref["model.layers.1.mlp.down_proj.weight"])
    assert not (tmp_path / "work" / "trainer" / "checkpoint-4" / "ref").exists()  # no copied reference adapter


def test_dpo_settings_fail_loudly():
    with pytest.raises(ValueError, match="beta"):
        DpoSettings(beta=0).validate()
    with pytest.raises(ValueError, match="qlora"):
        DpoSettings(method="qlora").validate()
