"""Side-by-side evaluation on a tiny base: the held-out data every model gets, and figures with known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llm_assets.lib.evaluate.evaluation import (EvalData, EvalSettings, ModelFigures, PeakMemory, evaluate_model,
                                                generate, perplexity, rouge_l, validation_windows)
from llm_assets.lib.posttrain.preferences import PreferencePair
from llm_assets.lib.pretrain.model_dir import load_model, weights_bytes

CHATS = [[{"role": "user", "content": f"Explain what `mod.f{i}(x)` does."},
          {"role": "assistant", "content": f"Return x times {i}."}] for i in range(12)]
PAIRS = [PreferencePair(f"What is {i} + 1?", f"{i + 1}", f"{i + 2}", f"p#L{i}") for i in range(6)]
SMALL = EvalSettings(perplexity_windows=4, instruction_examples=8, preference_pairs=4, generation_prompts=3,
                     max_new_tokens=5, samples=1)


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def data(tok):
    stream = np.arange(7, 407, dtype=np.uint16)  # 400 validation tokens
    return EvalData.build(stream, CHATS, PAIRS, tok, SMALL, seq_len=64)


def test_validation_windows_are_evenly_spaced_and_cover_the_stream():
    tokens = np.arange(100)
    w = validation_windows(tokens, seq_len=9, n=4)
    assert w.shape == (4, 10) and w.dtype == torch.int64
    assert w[:, 0].tolist() == [0, 30, 60, 90] and w[-1, -1] == 99  # first at 0, last ends at the end
    assert torch.equal(w[1], torch.arange(30, 40))
    with pytest.raises(ValueError, match="seq_len: the validation stream holds 9 tokens"):
        validation_windows(np.arange(9), seq_len=9, n=2)


def test_eval_data_is_encoded_once_and_capped_by_the_settings(data, tok):
    assert data.windows.shape == (4, 65)
    assert len(data.chats) == 8 and len(data.pairs) == 4
    assert len(data.prompts) == len(data.references) == 3
    assert set(data.references) <= {c[-1]["content"] for c in CHATS}
    assert all(p[-1] == tok.convert_tokens_to_ids("<|assistant|>") for p in data.prompts)  # the generation prompt
    assert data.pad_id == tok.pad_token_id


def test_eval_data_fails_when_nothing_fits(tok):
    with pytest.raises(ValueError, match="fits in seq_len"):
        EvalData.build(np.arange(7, 100, dtype=np.uint16), CHATS, PAIRS, tok, SMALL, seq_len=8)


def test_perplexity_of_a_model_that_knows_nothing_is_the_vocabulary_size(tiny_base_dir, data, tok):
    model = load_model(tiny_base_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # tied head: every logit is 0, every token equally likely
    assert perplexity(model, data.windows) == pytest.approx(len(tok), rel=1e-4)


def test_generate_is_greedy_and_reports_time_per_token(tiny_base_dir, data, tok):
    model = load_model(tiny_base_dir)
    texts, per_token, n, ids = generate(model, tok, data.prompts, max_new_tokens=5)
    again, _, n_again, _ = generate(model, tok, data.prompts, max_new_tokens=5)
    assert texts == again and n == n_again and 0 < n <= 5 * len(data.prompts)
    assert len(per_token) == len(data.prompts) and all(t > 0 for t in per_token)
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in ids] == texts


def test_generate_follows_the_models_generation_config(tiny_base_dir, data, tok):
    """The shipped generation_config.json decides decoding: a no-repeat rule removes every repeat."""
    from llm_assets.lib.posttrain.generation import max_token_run

    model = load_model(tiny_base_dir)
    model.generation_config.no_repeat_ngram_size = 1  # no token twice in one sequence
    _, _, _, ids = generate(model, tok, data.prompts, max_new_tokens=12)
    assert all(max_token_run(r) <= 1 for r in ids)


def test_evaluate_model_generates_in_batches_what_one_at_a_time_generates(tiny_base_dir, data, tok):
    """The quality figures come from batched generation with the shipped config (a repetition
    penalty here); latency from one prompt at a time. Both give the same replies."""
    model = load_model(tiny_base_dir)
    model.generation_config.repetition_penalty = 1.3
    one_at_a_time, _, _, _ = generate(model, tok, data.prompts, max_new_tokens=5)
    settings = SMALL.model_copy(update={"batch_size": 3, "latency_prompts": 1})
    _, texts = evaluate_model(lambda: model, tiny_base_dir, tok, data, settings)
    assert texts == one_at_a_time


def test_rouge_l_is_one_for_the_reference_and_zero_for_nothing_in_common():
    assert rouge_l(["return x times two"], ["return x times two"]) == 1.0
    assert rouge_l(["completely unrelated"], ["return x times two"]) == 0.0
    assert rouge_l(["return x", "nothing"], ["return x", "else"]) == pytest.approx(0.5)


def test_peak_memory_sees_50_mb_of_new_resident_pages():
    # A fresh anonymous mapping, touched page by page: 50 MB more resident memory whatever the allocator
    # kept from earlier tests (an np.ones block came from freed heap pages in CI and raised RSS by 28 MB).
    import mmap

    with PeakMemory() as memory:
        block = mmap.mmap(-1, 50_000_000)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
    block.close()
    assert memory.peak >= 45_000_000


def test_evaluate_model_figures(tiny_base_dir, data, tok):
    loads = []

    def load():
        loads.append(1)
        return load_model(tiny_base_dir)

    figures, texts = evaluate_model(load, tiny_base_dir, tok, data, SMALL)
    assert isinstance(figures, ModelFigures) and loads == [1]  # loaded once, inside the memory probe
    assert 1 < figures.val_perplexity < 10 * len(tok)
    assert 0 < figures.instruction_loss < 3 * np.log(len(tok))
    assert figures.preference_accuracy in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 pairs
    assert 0.0 <= figures.rouge_l <= 1.0 and len(texts) == 3
    # an untrained model's generation_config has no repetition rule: shipped = plain greedy
    assert figures.rouge_l_plain_greedy == figures.rouge_l
    assert figures.max_token_run >= 1 and 0 <= figures.repeating_replies <= 1
    assert np.isnan(figures.reward_mean)  # no judge given
    assert figures.empty_generations == sum(not t for t in texts)
    assert 0 < figures.latency_ms_per_token_p50 <= figures.latency_ms_per_token_p95
    assert figures.tokens_per_second > 0 and figures.peak_memory_bytes >= 0
    assert figures.parameters == sum(p.numel() for p in load_model(tiny_base_dir).parameters())
    assert figures.disk_bytes == weights_bytes(tiny_base_dir) > 0
    # a quantized model reports its source's parameter count, as the caller passes it
    assert evaluate_model(load, tiny_base_dir, tok, data, SMALL, parameters=123)[0].parameters == 123


@pytest.mark.parametrize("field", ["perplexity_windows", "generation_prompts", "max_new_tokens", "samples",
                                   "batch_size", "latency_prompts"])
def test_bad_settings_fail_naming_the_field(field):
    with pytest.raises(ValueError, match=f"^{field}: must be at least 1"):
        EvalSettings(**{field: 0}).validate()
