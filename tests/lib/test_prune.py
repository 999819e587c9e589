"""Pruning on the tiny model: importance finds a dead head and channel, the least important units are
the ones removed, the pruned model loads with from_pretrained, and recovery lowers its perplexity."""

import pytest
import torch

from llm_assets.lib.evaluate.evaluation import validation_windows
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.prune import PruneSettings, cut, importance, keep_counts, prune


def test_importance_finds_the_units_that_do_nothing_and_those_are_cut(tiny_teacher):
    teacher_dir, corpus, _ = tiny_teacher
    model = load_model(teacher_dir)  # 2 blocks, 2 heads of 32, FFN 192
    with torch.no_grad():  # silence head 1 of block 0 and channel 7 of block 1: removing them costs nothing
        model.model.layers[0].self_attn.o_proj.weight[:, 32:] = 0
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0
    calibration = validation_windows(corpus[0], 64, 8)
    heads, channels = importance(model, calibration)
    assert heads.shape == (2, 2) and channels.shape == (2, 192)
    assert heads[0, 1] == 0 < heads[0, 0] and channels[1, 7] == 0 < channels[1].max()
    assert all(p.grad is None for p in model.parameters())  # nothing left behind

    s = PruneSettings(head_share=0.5, ffn_share=0.5)
    assert keep_counts(model.config, 0.5, 0.5) == (1, 96) and keep_counts(model.config, 0.0, 0.0) == (2, 192)
    pruned, removed = cut(model, s, calibration)
    assert removed.startswith("0:1;")  # block 0 lost its silent head
    keep1 = torch.topk(heads[1], 1).indices.item()
    assert removed == f"0:1; 1:{1 - keep1}"
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[1].mlp
    assert torch.equal(attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight[:32])
    assert torch.equal(attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight[:, :32])
    kept_channels = torch.sort(torch.topk(channels[1], 96).indices).values
    assert 7 not in kept_channels.tolist()
    assert torch.equal(mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight[:, kept_channels])
    assert torch.equal(mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight[kept_channels])
    x = calibration[:2, :-1]
    assert pruned(x).logits.shape == model(x).logits.shape


def test_pruned_model_loads_and_recovery_lowers_its_perplexity(tiny_teacher, tmp_path):
    teacher_dir, corpus, chats = tiny_teacher
    s = PruneSettings(head_share=0.5, ffn_share=0.5, importance_windows=8, corpus_windows=24, sft_examples=24,
                      eval_examples=16, max_len=64, epochs=20.0, max_steps=20, batch_size=8, lr=3e-3, warmup_ratio=0, eval_every=10,
                      log_every=5, precision="fp32")
    result = prune(s, teacher_dir, corpus, chats, tmp_path / "work", tmp_path, log=lambda e: None)
    m = result.metrics
    assert (m.heads_before, m.heads_after, m.ffn_channels_before, m.ffn_channels_after) == (2, 1, 192, 96)
    assert m.parameters_after < m.parameters_before
    assert m.perplexity_unpruned < m.perplexity_pruned  # cutting half of every block costs something
    assert m.perplexity_recovered < m.perplexity_pruned, (m.perplexity_pruned, m.perplexity_recovered)
    assert m.held_out_kl_recovered < m.held_out_kl_pruned
    model = load_model(tmp_path)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim,
            model.config.intermediate_size) == (1, 1, 32, 96)
    assert sum(p.numel() for p in model.parameters()) == m.parameters_after


def test_kept_heads_divide_the_width_as_transformers_requires():
    from transformers import LlamaConfig

    demo = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=704)
    assert keep_counts(demo, 0.25, 0.25) == (2, 512)  # 3 heads would not divide 256: LlamaConfig refuses to save it
    assert keep_counts(demo, 0.5, 0.0) == (2, 704) and keep_counts(demo, 0.9, 0.9) == (1, 64)
    gqa = LlamaConfig(hidden_size=384, num_attention_heads=6, num_key_value_heads=3, intermediate_size=1024)
    assert keep_counts(gqa, 0.34, 0.0) == (2, 1024)  # 2 groups of 2 query heads: 4 divides 384


def test_settings_are_checked():
    with pytest.raises(ValueError, match="head_share"):
        PruneSettings(head_share=1.0).validate()
