import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from llm_assets.lib.posttrain.chat_data import END_TOKEN, encode_chat, end_token_id, pad_batch
from llm_assets.lib.posttrain.generation import (GENERATION_CONFIG, candidate_grid, choose_generation_config,
                                                 generate_ids, generate_replies, greedy_config, max_token_run,
                                                 repeats, rouge_l_scores, sample_replies, write_generation_config)
from llm_assets.lib.pretrain.model import build_model
from llm_assets.lib.pretrain.model_dir import save_model
from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

# Prompts of different lengths, so a batch holds rows with different amounts of left padding.
CHATS = [[{"role": "user", "content": f"Explain what `m{i}.f{'g' * (3 * i)}(x{', y' * i})` does."},
          {"role": "assistant", "content": f"Return x plus {i}."}] for i in range(8)]


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few seconds on CHATS: it answers and then emits <|end|>, so
    generation stops early (an untrained model always runs to max_new_tokens)."""
    tok = train_tokenizer([m["content"] for chat in CHATS for m in chat] * 4, vocab_size=300)
    return fit_tiny(CHATS, tok), tok


def fit_tiny(chats, tok):
    """A tiny model trained 60 full-batch steps on `chats` (seeded), in eval mode."""
    torch.manual_seed(0)
    model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    batch = pad_batch([encode_chat(tok, chat, 128) for chat in chats], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_batched_generation_equals_one_at_a_time_and_stops(trained):
    model, tok = trained
    prompts = [chat[:-1] for chat in CHATS]
    one = generate_ids(model, tok, prompts, max_new_tokens=16, batch_size=1)
    batched = generate_ids(model, tok, prompts, max_new_tokens=16, batch_size=3)  # 3, 3, 2: uneven batches
    assert batched == one
    stop = {end_token_id(tok), tok.eos_token_id, tok.pad_token_id}
    assert not any(t in stop for ids in one for t in ids)
    assert any(len(ids) < 16 for ids in one)  # it stopped at <|end|>, not at the budget
    replies = generate_replies(model, tok, prompts, max_new_tokens=16, batch_size=5)
    assert replies == [tok.decode(ids, skip_special_tokens=True).strip() for ids in one]
    assert not any(END_TOKEN in r or "<|" in r for r in replies)
    # trained on exactly these chats: most greedy replies are the reference
    assert sum(r == chat[-1]["content"] for r, chat in zip(replies, CHATS)) >= len(CHATS) // 2


def test_generation_config_overrides_greedy_and_precision_is_checked():
    tok = train_tokenizer([m["content"] for chat in CHATS for m in chat] * 4, vocab_size=300)
    torch.manual_seed(1)
    model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    prompts = [chat[:-1] for chat in CHATS[:4]]
    plain = generate_ids(model, tok, prompts, max_new_tokens=24)
    assert all(len(ids) == 24 for ids in plain)  # random weights never stop
    no_repeat = generate_ids(model, tok, prompts, 24, generation_config=greedy_config(tok, 24, no_repeat_ngram_size=1))
    # no_repeat_ngram_size=1 forbids any token the row already holds, prompt included
    assert all(len(set(ids)) == len(ids) for ids in no_repeat) and no_repeat != plain
    assert len(generate_replies(model, tok, prompts, 4, precision="bf16")) == 4
    with pytest.raises(ValueError, match="precision"):
        generate_replies(model, tok, prompts, 4, precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        generate_replies(model, tok, prompts, 4, batch_size=0)


def test_sampled_replies_are_seeded_and_vary(trained):
    model, tok = trained
    prompts = [chat[:-1] for chat in CHATS[:3]]
    replies = sample_replies(model, tok, prompts, samples=4, temperature=2.0, max_new_tokens=8, batch_size=5, seed=1)
    assert [len(r) for r in replies] == [4, 4, 4]
    assert replies == sample_replies(model, tok, prompts, samples=4, temperature=2.0, max_new_tokens=8, batch_size=5, seed=1)
    assert any(len(set(r)) > 1 for r in replies)  # at temperature 2 a prompt's samples differ
    with pytest.raises(ValueError, match="must be positive"):
        sample_replies(model, tok, prompts, samples=2, temperature=0.0, max_new_tokens=8)


def test_rouge_l_scores_per_prediction():
    scores = rouge_l_scores(["Return x plus one.", "nothing alike", ""], ["Return x plus 1.", "Return x.", "Return x."])
    assert scores[0] == pytest.approx(0.75) and scores[1:] == [0.0, 0.0]
    with pytest.raises(ValueError, match="1 references for 2"):
        rouge_l_scores(["a", "b"], ["a"])


@pytest.mark.parametrize("ids, run", [([], 0), ([4], 1), ([4, 5, 6], 1), ([4, 4, 5, 5, 5, 4], 3), ([7] * 9, 9)])
def test_max_token_run(ids, run):
    assert max_token_run(ids) == run


@pytest.mark.parametrize("text, n, expected", [
    ("", 3, False), ("the the the", 3, True), ("The the THE end", 3, True), ("the the end", 3, False),
    ("the the end", 2, True), ("x, x, x", 3, True), ("the end, the end, the end", 3, False), ("ééé é é é", 3, True)])
def test_repeats(text, n, expected):
    assert repeats(text, n) is expected


def test_repeats_needs_n_of_two_or_more():
    with pytest.raises(ValueError, match="n:"):
        repeats("a a", 1)


def test_choose_generation_config_scores_every_candidate_and_prefers_the_simplest(trained):
    model, tok = trained
    grid = candidate_grid(penalties=(1.5, 1.0), ngram_sizes=(3, 0))  # any order: simplest-first inside
    config, rows = choose_generation_config(model, tok, CHATS, 16, grid, batch_size=4)
    assert len(rows) == len(grid) and all(0 <= r["rouge_l"] <= 1 and 0 <= r["repeats_share"] <= 1 for r in rows)
    best = max(r["rouge_l"] for r in rows)
    chosen = next(r for r in rows if (r["repetition_penalty"], r["no_repeat_ngram_size"]) ==
                  (config.repetition_penalty, config.no_repeat_ngram_size))
    assert chosen["rouge_l"] == pytest.approx(best)
    # every simpler candidate scored lower or looped longer (rows come simplest first)
    assert all(r["rouge_l"] < best or r["longest_token_run"] > chosen["longest_token_run"]
               for r in rows[: rows.index(chosen)])
    assert config.do_sample is False and config.eos_token_id == [end_token_id(tok), tok.eos_token_id]
    assert config.pad_token_id == tok.pad_token_id and config.max_new_tokens == 16
    # all candidates the same: the plain greedy one wins the tie
    same, _ = choose_generation_config(model, tok, CHATS[:2], 16, [{"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}] * 2)
    assert (same.repetition_penalty, same.no_repeat_ngram_size) == (1.0, 0)
    with pytest.raises(ValueError, match=r"chats\[0\]"):
        choose_generation_config(model, tok, [CHATS[0][:1]], 16, grid)


def test_a_model_that_scores_nothing_gets_the_rule_that_stops_its_loops_and_never_replies_empty():
    """Trained to answer half its prompts with a loop and half with nothing: every candidate's
    ROUGE-L is 0 against unrelated references, so the tie goes to the rule with the shortest token
    run, and the shipped config still makes the silent prompts say something."""
    chats = [[{"role": "user", "content": f"{verb} {w}."}, {"role": "assistant", "content": reply}]
             for w in ("one", "two", "three", "four") for verb, reply in (("Repeat", "go " * 12), ("Hush", ""))]
    tok = train_tokenizer([m["content"] for chat in chats for m in chat] * 8 + ["zebra quokka"] * 8, vocab_size=300)
    model = fit_tiny(chats, tok)
    prompts = [chat[:-1] for chat in chats]
    plain = generate_ids(model, tok, prompts, max_new_tokens=16, batch_size=4)
    assert max(map(max_token_run, plain)) > 3 and min(map(len, plain)) == 0  # it learned both habits
    scored = [chat[:-1] + [{"role": "assistant", "content": "Zebra quokka."}] for chat in chats]
    config, rows = choose_generation_config(model, tok, scored, 16, candidate_grid((1.0,), (0, 3)), batch_size=4)
    assert [r["rouge_l"] for r in rows] == [0.0, 0.0] and rows[0]["longest_token_run"] > 3
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens) == (1.0, 3, 1)
    shipped = generate_ids(model, tok, prompts, max_new_tokens=16, batch_size=4, generation_config=config)
    assert max(map(max_token_run, shipped)) <= 3 and min(map(len, shipped)) >= 1


def test_write_generation_config_replaces_the_model_directorys_file(trained, tmp_path):
    model, tok = trained
    save_model(model, tok, tmp_path)
    config = greedy_config(tok, 20, repetition_penalty=1.3, no_repeat_ngram_size=4)
    write_generation_config(tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert json.loads((tmp_path / GENERATION_CONFIG).read_text())["repetition_penalty"] == 1.3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).generation_config  # what every reader gets
    assert (reloaded.repetition_penalty, reloaded.no_repeat_ngram_size, reloaded.eos_token_id) == (
        1.3, 4, [end_token_id(tok), tok.eos_token_id])
    assert GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 20
    with pytest.raises(FileNotFoundError, match="missing"):
        write_generation_config(tmp_path / "missing", config)


def test_tuning_and_evaluation_prompts_are_disjoint_halves():
    from llm_assets.lib.posttrain.generation import EVALUATION, TUNING, held_out_prompts
    from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

    chats = [[{"role": "user", "content": f"Explain f{i}."}, {"role": "assistant", "content": f"It adds {i}."}]
             for i in range(40)]
    tok = train_tokenizer([m["content"] for c in chats for m in c], vocab_size=300)
    evaluation = held_out_prompts(tok, chats, 10, EVALUATION, max_new_tokens=8, context=64)
    tuning = held_out_prompts(tok, chats, 10, TUNING, max_new_tokens=8, context=64)
    assert len(evaluation) == len(tuning) == 10
    assert not {c[0]["content"] for c in evaluation} & {c[0]["content"] for c in tuning}
    assert held_out_prompts(tok, chats, 10, TUNING, max_new_tokens=80, context=64) == []  # no room to generate


def test_tune_model_dir_writes_the_chosen_rule(tmp_path):
    from transformers import GenerationConfig

    from llm_assets.lib.posttrain.generation import TuningSettings, tune_model_dir
    from llm_assets.lib.pretrain.model import build_model
    from llm_assets.lib.pretrain.model_dir import save_model
    from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

    chats = [[{"role": "user", "content": f"Explain f{i}."}, {"role": "assistant", "content": f"It adds {i}."}]
             for i in range(12)]
    tok = train_tokenizer([m["content"] for c in chats for m in c], vocab_size=300)
    save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, tmp_path)
    settings = TuningSettings(tuning_prompts=4, tuning_max_new_tokens=4, repetition_penalties=[1.0, 1.3],
                              no_repeat_ngram_sizes=[0])
    config, rows = tune_model_dir(tmp_path, chats, settings)
    assert len(rows) == 2 and {r["repetition_penalty"] for r in rows} == {1.0, 1.3}
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.repetition_penalty == config.repetition_penalty and saved.do_sample is False
