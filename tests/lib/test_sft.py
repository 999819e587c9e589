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
from llm_assets.lib.posttrain.sft import SftSettings, train_sft

CHATS = [[{"role": "user", "content": f"Explain what `mod.f{i}(x, y={i})` does."},
          {"role": "assistant", "content": f"Return x plus {i} times y, rounded down."}] for i in range(24)]


def settings(method="lora", **kw) -> SftSettings:
    base = dict(max_len=128, max_steps=4, batch_size=4, lr=5e-3, warmup_steps=0, eval_every=2,
                eval_examples=8, save_every=2, log_every=1)
    return SftSettings(method=method, r=4, alpha=8, dropout=0.0, **{**base, **kw})


def test_lora_trains_adapter_only_and_saves_adapter_and_merged_model(tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    result = train_sft(settings(), tiny_base_dir, CHATS[:16], CHATS[16:], tmp_path / "work", out, log=lambda e: None)
    m = result.metrics
    assert 0 < m.trainable_parameters < m.total_parameters
    assert m.trainable_share == pytest.approx(m.trainable_parameters / m.total_parameters)
    assert json.loads((out / "metrics.json").read_text()) == asdict(m)
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
