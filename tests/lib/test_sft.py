"""Instruction tuning mechanics on a tiny untrained model: what trains, what is saved, what loads."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.lib.posttrain.adapters import attach_adapter, merge_into_fp32
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.posttrain.chat_data import encode_chat, pad_batch
from llm_assets.lib.posttrain.sft import SftSettings, encode_splits, read_result, train_sft

CHATS = [[{"role": "user", "content": f"Explain what `mod.f{i}(x, y={i})` does."},
          {"role": "assistant", "content": f"Return x plus {i} times y, rounded down."}] for i in range(24)]


def settings(method="lora", **kw) -> SftSettings:
    base = dict(r=4, alpha=8, dropout=0.0, max_len=128, epochs=1.0, batch_size=4, lr=5e-3, warmup_ratio=0.0,
                eval_every=2, eval_examples=8, log_every=1)  # 16 training chats: 4 steps
    return SftSettings(method=method, **{**base, **kw})


def test_long_chats_are_truncated_and_named_by_source(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}, CHATS[0][1]]
    train, held, too_long = encode_splits(tok, [CHATS[0], long], [long], settings(max_len=64),
                                          (["a.json#L1", "a.json#L9"], ["b.jsonl#L2"]))
    assert len(train) == 2 and len(held) == 1 and max(len(e["input_ids"]) for e in train + held) <= 64
    assert too_long.truncated == ["a.json#L9", "b.jsonl#L2"] and too_long.dropped == []
    assert encode_splits(tok, [long], [long], settings(max_len=64))[2].truncated == ["train[0]", "validation[0]"]


def test_lora_trains_adapter_only_and_saves_adapter_and_merged_model(tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    result = train_sft(settings(), tiny_base_dir, CHATS[:16], CHATS[16:], tmp_path / "work", out, log=lambda e: None)
    m = result.metrics
    assert m.dropped_too_long == m.truncated_to_fit == 0 and m.too_long_examples == "truncated 0; dropped 0"
    assert 0 < m.trainable_parameters < m.total_parameters
    assert m.trainable_share == pytest.approx(m.trainable_parameters / m.total_parameters)
    assert json.loads((out / "metrics.json").read_text()) == asdict(m)
    assert read_result(out) == result  # what the asset reads back after a torchrun run
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    base = load_file(tiny_base_dir / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # trained: lora_B starts at zero and must have moved
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # no PEFT needed
    merged_sd = merged.state_dict()
    # frozen parts are bit-identical to the base; adapted projections moved
    assert torch.equal(merged_sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(merged_sd["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(merged_sd["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    # the merged model computes what base + adapter computes
    tok = AutoTokenizer.from_pretrained(out / "merged")
    batch = pad_batch([encode_chat(tok, CHATS[0], 128)], tok.pad_token_id)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(load_model(tiny_base_dir), out / "adapter").eval()
    with torch.no_grad():
        a = peft_model(input_ids=batch["input_ids"]).logits
        b = merged.eval()(input_ids=batch["input_ids"]).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert merged.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    generated = merged.generate(batch["input_ids"][:, :10], max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 10
    assert m.eval_reply_loss_after < m.eval_reply_loss_before  # 4 steps at 5e-3 on a random model


@pytest.mark.parametrize("method, adapter_key", [("qlora", "lora_A"), ("ia3", "ia3_l")])
def test_qlora_and_ia3_train_a_few_steps(tiny_base_dir, tmp_path, method, adapter_key):
    out = tmp_path / "out"
    result = train_sft(settings(method), tiny_base_dir, CHATS[:16], CHATS[16:], tmp_path / "work", out,
                       log=lambda e: None)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(adapter_key in k for k in adapter)
    # trained: the adapter starts as a no-op and every trainable tensor of it must have moved
    if method == "ia3":  # IA3 vectors start at one
        assert all(not torch.allclose(v, torch.ones_like(v)) for v in adapter.values())
    else:  # lora_B starts at zero
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b)  # every projection, both blocks
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert next(merged.parameters()).dtype == torch.float32  # merged into fp32, not into 4-bit
    assert result.metrics.trainable_parameters > 0
    if method == "qlora":
        model = attach_adapter(load_model(tiny_base_dir, four_bit=True), settings(method).adapter)
        import bitsandbytes as bnb
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 2 * 7  # every projection of both blocks is 4-bit
        with torch.no_grad():  # an evaluation must not switch the weights to bnb's inference-only layout
            model.eval()(input_ids=torch.tensor([[1, 2, 3]]))
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # the saved adapter merges again to the same weights
    again = merge_into_fp32(tiny_base_dir, out / "adapter").state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, again[k]), k


class Killed(Exception):
    pass


def test_killed_run_resumes_from_its_last_checkpoint(tiny_base_dir, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"

    def die_at_step_3(event):
        if event.get("step") == 3:
            raise Killed

    with pytest.raises(Killed):
        train_sft(settings(), tiny_base_dir, CHATS[:16], CHATS[16:], work, out, log=die_at_step_3)
    assert not out.exists()  # no half artifact
    assert (work / "trainer" / "checkpoint-2").is_dir()
    events = []
    result = train_sft(settings(), tiny_base_dir, CHATS[:16], CHATS[16:], work, out, log=events.append)
    assert result.metrics.resumed_from.endswith("checkpoint-2")
    assert any(e["event"] == "resume" for e in events)
    assert (out / "merged" / "model.safetensors").is_file()
    # other settings never resume someone else's checkpoint
    events.clear()
    result = train_sft(settings(lr=1e-3), tiny_base_dir, CHATS[:16], CHATS[16:], work, out, log=events.append)
    assert result.metrics.resumed_from == ""
    assert any(e["event"] == "start_over" for e in events)


# Single tokens of tiny_base_dir's tokenizer: every reply below is one of them plus <|end|>, 2 tokens.
WORDS = ["None", "def", "heap", "item", "key", "line", "pos", "self", "val", "whi"]


def noise_chats(seed: int) -> list[list[dict]]:
    """40 prompts "Item i?", each answered by a random word: the format and the word list generalize,
    which word answers which item is noise. The held-out chats (another seed) ask the same 40
    prompts with other random answers, so memorizing the training answers can only hurt them."""
    import random

    rng = random.Random(seed)
    return [[{"role": "user", "content": f"Item {i}?"}, {"role": "assistant", "content": rng.choice(WORDS)}]
            for i in range(40)]


@pytest.fixture(scope="module")
def sharp_base_dir(tiny_base_dir, tmp_path_factory):
    """tiny_base_dir with its (tied) embeddings scaled x10: the untrained ones (std 0.02) cap the
    logits near +-1.3, so a LoRA on them can neither fit nor overfit; x10 gives a trained model's
    range of logits."""
    from llm_assets.lib.pretrain.model_dir import save_model

    model = load_model(tiny_base_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    out = tmp_path_factory.mktemp("sharp_base")
    save_model(model, AutoTokenizer.from_pretrained(tiny_base_dir), out)
    return out


def overfitting(**kw) -> SftSettings:
    """40 epochs of the 40 noise chats, held-out loss every 10 steps, fp32 so the Trainer's held-out
    loss and the merged model's are computed alike (the replies' equal length makes the Trainer's
    per-batch means the per-token mean reply_loss takes)."""
    return settings(r=16, alpha=32, max_len=64, batch_size=8, lr=3e-3, epochs=40, max_steps=1000, eval_every=10,
                    eval_examples=0, precision="fp32", **kw)


def test_best_checkpoint_is_kept_when_the_schedule_overfits(sharp_base_dir, tmp_path):
    result = train_sft(overfitting(), sharp_base_dir, noise_chats(0), noise_chats(1), tmp_path / "work",
                       tmp_path / "out", log=lambda e: None)
    m = result.metrics
    evals = [(r["step"], r["eval_loss"]) for r in result.history if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert m.planned_steps == m.steps_run == 200 and not m.stopped_early and m.epochs == pytest.approx(40)
    # the schedule really overfits: held-out loss rose well above its minimum while training loss fell
    assert best_step < evals[-1][0] and max(loss for step, loss in evals if step > best_step) > best_loss + 0.1
    assert m.overfitting_from_step == best_step
    # the Trainer kept that checkpoint: merged/ scores what the best evaluation logged
    assert (m.best_step, m.best_eval_loss, m.last_eval_loss) == (best_step, best_loss, evals[-1][1])
    assert m.eval_reply_loss_after == pytest.approx(best_loss, abs=1e-3)
    assert m.eval_reply_loss_after < m.last_eval_loss


def test_patience_stops_early_and_still_keeps_the_best(sharp_base_dir, tmp_path):
    result = train_sft(overfitting(patience=2), sharp_base_dir, noise_chats(0), noise_chats(1), tmp_path / "work",
                       tmp_path / "out", log=lambda e: None)
    m = result.metrics
    evals = [(r["step"], r["eval_loss"]) for r in result.history if "eval_loss" in r]
    assert m.stopped_early and m.steps_run < m.planned_steps and m.steps_run == evals[-1][0]
    # stopped at the second evaluation in a row without a new best
    assert [step for step, _ in evals if step > m.best_step] == [m.best_step + 10, m.best_step + 20]
    assert m.eval_reply_loss_after == pytest.approx(m.best_eval_loss, abs=1e-3)


def test_schedule_settings_fail_loudly():
    for change, field in (({"epochs": 0}, "epochs"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
                          ({"patience": -1}, "patience"), ({"precision": "fp16"}, "precision")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            settings(**change).validate()
