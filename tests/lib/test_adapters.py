"""PEFT adapters on a tiny base: what trains, how much, and that a merge computes what base + adapter does."""

from __future__ import annotations

import pytest
import torch

from llm_assets.lib.posttrain.adapters import (IA3_TARGETS, LLAMA_LINEAR, AdapterSettings, attach_adapter,
                                               merge_into_fp32, parameter_counts, peft_config)
from llm_assets.lib.pretrain.model import MODEL_SIZES, count_parameters
from llm_assets.lib.pretrain.model_dir import adapter_dir, load_model

TINY = MODEL_SIZES["tiny"]
IDS = torch.tensor([[1, 10, 20, 30, 40, 50]])


def lora_parameters(r: int, targets=LLAMA_LINEAR) -> int:
    """r * (in + out) per adapted Linear, per block."""
    d, ff = TINY.d_model, TINY.d_ff
    shape = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
             "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    return TINY.n_layers * sum(r * sum(shape[t]) for t in targets)


@pytest.mark.parametrize("r, targets", [(4, LLAMA_LINEAR), (8, ("q_proj", "v_proj"))])
def test_lora_trains_exactly_its_low_rank_matrices_and_starts_as_a_no_op(tiny_base_dir, r, targets):
    base = load_model(tiny_base_dir).eval()
    with torch.no_grad():
        before = base(IDS).logits
    n_base = count_parameters(base)
    model = attach_adapter(base, AdapterSettings(method="lora", r=r, alpha=2 * r, dropout=0.0,
                                                 target_modules=list(targets))).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert parameter_counts(model) == (lora_parameters(r, targets), n_base + lora_parameters(r, targets))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # lora_B starts at zero


def test_ia3_scales_keys_values_and_the_mlp_input(tiny_base_dir):
    model = attach_adapter(load_model(tiny_base_dir), AdapterSettings(method="ia3"))
    vectors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-3] for n in vectors} == set(IA3_TARGETS)
    d, ff = TINY.d_model, TINY.d_ff
    assert parameter_counts(model)[0] == TINY.n_layers * (d + d + ff)  # k, v outputs; down_proj's input
    assert all(torch.equal(v, torch.ones_like(v)) for v in vectors.values())  # a no-op until trained
    assert parameter_counts(model)[0] * 10 < lora_parameters(16)  # about a tenth of LoRA's at the default rank


def test_merge_computes_what_base_plus_adapter_computes(tiny_base_dir, tmp_path):
    model = attach_adapter(load_model(tiny_base_dir), AdapterSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():  # stand in for training: move every lora_B off zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        adapted = model.eval()(IDS).logits
    model.save_pretrained(adapter_dir(tmp_path))
    merged = merge_into_fp32(tiny_base_dir, adapter_dir(tmp_path)).eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    assert next(merged.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, adapted, atol=1e-5)
        assert not torch.allclose(merged(IDS).logits, load_model(tiny_base_dir).eval()(IDS).logits, atol=1e-3)


def test_merge_of_a_missing_adapter_fails_naming_the_file(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
        merge_into_fp32(tiny_base_dir, tmp_path)


def test_qlora_adapts_a_4bit_base_whose_weights_stay_trainable(tiny_base_dir):
    import bitsandbytes as bnb

    model = attach_adapter(load_model(tiny_base_dir, four_bit=True), AdapterSettings(method="qlora", r=4, alpha=8))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == TINY.n_layers * len(LLAMA_LINEAR)
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert parameter_counts(model)[0] == lora_parameters(4)


@pytest.mark.parametrize("change, field", [
    ({"method": "prefix"}, "method"), ({"r": 0}, "r"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": ["lm_head"]}, "target_modules"),
])
def test_bad_settings_fail_naming_the_field(change, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        peft_config(AdapterSettings(**change))


def test_peft_configs_carry_the_settings():
    lora = peft_config(AdapterSettings(r=8, alpha=16, dropout=0.1, target_modules=["q_proj"]))
    assert (lora.peft_type.value, lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (
        "LORA", 8, 16, 0.1, {"q_proj"})
    ia3 = peft_config(AdapterSettings(method="ia3"))
    assert (ia3.peft_type.value, set(ia3.target_modules), set(ia3.feedforward_modules)) == (
        "IA3", set(IA3_TARGETS), {"down_proj"})
