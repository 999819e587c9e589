"""The base model's size dial: configs, parameter counts, the cost estimates and the peak FLOP/s probe."""

import pytest
import torch
from transformers import LlamaForCausalLM

from llm_assets.lib.pretrain.model import (MODEL_SIZES, build_model, count_parameters, estimate_parameters,
                                           matmul_peak_flops, model_config, training_flops, training_memory_bytes)

VOCAB = 512


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_config_follows_the_size(size):
    s = MODEL_SIZES[size]
    c = model_config(size, VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        s.n_layers, s.d_model, s.n_heads, s.d_ff)
    assert c.max_position_embeddings == s.context and c.vocab_size == VOCAB
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 1, 2)
    assert c.tie_word_embeddings
    # bitsandbytes' CPU 4-bit kernel packs output rows in blocks of 32 (QLoRA and nf4 need it)
    assert s.d_model % 32 == 0 and s.d_ff % 32 == 0 and s.d_model % s.n_heads == 0


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_the_shape_formula_counts_every_parameter(size):
    with torch.device("meta"):  # the large size without allocating its weights
        model = build_model(size, VOCAB, 0, 1, 2)
    assert isinstance(model, LlamaForCausalLM)
    assert count_parameters(model) == estimate_parameters(MODEL_SIZES[size], VOCAB)


def test_tiny_model_is_fp32_tied_and_predicts_every_position():
    torch.manual_seed(0)
    model = build_model("tiny", VOCAB, 0, 1, 2)
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: counted once
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in model.state_dict().values())
    logits = model(torch.tensor([[0, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, VOCAB)


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build_model("tiny", VOCAB, 0, 1, 2)
    torch.manual_seed(3)
    b = build_model("tiny", VOCAB, 0, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_size_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"size: unknown model size 'huge'; choose one of \['demo', 'large', 'tiny'\]"):
        build_model("huge", VOCAB, 0, 1, 2)


def test_cost_estimates():
    assert training_memory_bytes(1_000_000) == 16_000_000  # weights, grads, two AdamW moments, fp32
    assert training_flops(1_000_000, tokens=2_000) == 6 * 1_000_000 * 2_000


def test_peak_flops_probe_measures_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    flops = matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert torch.equal(torch.rand(3), expected)
    assert 1e8 < flops < 1e14  # any CPU does more than 0.1 GFLOP/s, none 100 TFLOP/s in fp32
