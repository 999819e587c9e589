import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.lib.posttrain.chat_data import (IGNORE_INDEX, END_TOKEN, TooLong, encode_chat, encode_prompt_reply,
                                                end_token_id, fit, pad_batch, prompt_ids, reply_ids, reply_logprobs,
                                                reply_loss)

CHAT = [{"role": "user", "content": "Explain what `heapq.heappush(heap, item)` does."},
        {"role": "assistant", "content": "Push item onto heap, maintaining the heap invariant."}]


def test_reply_tokens_are_the_only_labels_and_match_joint_tokenization(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    ex = encode_chat(tok, CHAT, max_len=256)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[0] == tok.eos_token_id  # the document boundary pretraining saw
    # the ids are exactly the tokenization of the whole rendered chat (split at special tokens)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    joint = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[1:] == joint[: len(ids) - 1]
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == CHAT[1]["content"] + END_TOKEN
    assert tok.decode(ids[:n_prompt]).endswith("<|assistant|>")


def test_an_example_that_fits_is_untouched_and_one_token_more_is_truncated(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    n = len(encode_chat(tok, CHAT, max_len=256)["input_ids"])
    assert fit(tok, CHAT[:1], [CHAT[1]["content"]], n).truncated is False
    cut = fit(tok, CHAT[:1], [CHAT[1]["content"]], n - 1)
    assert cut.truncated and len(cut.example()["input_ids"]) <= n - 1
    assert cut.replies == [CHAT[1]["content"]] and cut.reply_ids[0][-1] == end_token_id(tok)  # the reply is whole
    assert CHAT[0]["content"].endswith(cut.prompt[0]["content"]) and cut.prompt[0]["content"]  # the start went
    assert encode_chat(tok, CHAT, max_len=4) is None  # not even the frame (eos, role tokens) fits


def _words(n: int, word: str) -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def test_a_long_dialogue_loses_its_oldest_turns_and_keeps_the_system_message(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    dialogue = [{"role": "system", "content": "Be brief."}]
    for turn in range(6):
        dialogue += [{"role": "user", "content": f"Question {turn}: " + _words(12, "ask")},
                     {"role": "assistant", "content": f"Answer {turn}: " + _words(12, "say")}]
    prompt, reply = dialogue[:-1], "The final answer."
    full = len(prompt_ids(tok, prompt)) + len(reply_ids(tok, reply))
    cut = fit(tok, prompt, [reply], 128)
    assert full > 128 and cut.truncated and len(cut.example()["input_ids"]) <= 128
    assert cut.replies == [reply] and cut.reply_ids[0] == reply_ids(tok, reply)  # the reply is kept whole
    assert cut.prompt[0] == dialogue[0] and cut.prompt[1]["role"] == "user"  # system kept; opens on a user turn
    assert cut.prompt[-1] == prompt[-1] and cut.prompt[1:] == prompt[len(prompt) - len(cut.prompt) + 1:]  # newest kept
    assert len(cut.prompt) < len(prompt)


def test_a_long_reply_is_cut_at_its_end_and_keeps_at_least_half_of_max_len(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompt = [{"role": "user", "content": _words(80, "context")}]  # ~ the whole budget on its own
    reply = _words(80, "reply")
    cut = fit(tok, prompt, [reply], 128)
    ex = cut.example()
    assert cut.truncated and len(ex["input_ids"]) == 128
    trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert len(trained) >= 64 and trained == reply_ids(tok, reply)[: len(trained)]  # the reply's start, no <|end|>
    assert end_token_id(tok) not in trained and reply.startswith(cut.replies[0])
    assert prompt[0]["content"].endswith(cut.prompt[0]["content"])  # the prompt keeps its end


def test_one_prompt_is_truncated_for_both_replies(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompt = [{"role": "user", "content": _words(60, "context")}]
    cut = fit(tok, prompt, ["Short.", _words(30, "long")], 96)
    chosen, rejected = cut.example(0), cut.example(1)
    assert max(len(chosen["input_ids"]), len(rejected["input_ids"])) <= 96
    n = len(cut.prompt_ids)
    assert chosen["input_ids"][:n] == rejected["input_ids"][:n] == cut.prompt_ids  # the same prompt on both sides
    assert cut.replies[0] == "Short."


def test_too_long_names_the_first_few():
    too_long = TooLong()
    for i in range(7):
        too_long.truncated.append(f"hh.jsonl#L{i + 1}")
    too_long.dropped.append("hh.jsonl#L9")
    assert too_long.examples() == ("truncated 7: hh.jsonl#L1, hh.jsonl#L2, hh.jsonl#L3, hh.jsonl#L4, hh.jsonl#L5 "
                                   "(+2 more); dropped 1: hh.jsonl#L9")
    assert TooLong().examples() == "truncated 0; dropped 0"


def test_pad_batch_and_scores_ignore_padding(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    short = encode_prompt_reply(tok, CHAT[:1], "Push.", 256)
    long = encode_chat(tok, CHAT, 256)
    batch = pad_batch([short, long], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].sum() == len(short["input_ids"])
    assert (batch["labels"][0, len(short["input_ids"]):] == IGNORE_INDEX).all()
    # scoring in a padded batch equals scoring alone
    together = reply_logprobs(model, [short, long], tok.pad_token_id)
    alone = [reply_logprobs(model, [e], tok.pad_token_id)[0] for e in (short, long)]
    for (a, n), (b, m) in zip(together, alone):
        assert n == m and abs(a - b) < 1e-4
    # reply tokens: "Push." + <|end|>; the mean loss is the negative summed log-prob per token
    assert together[0][1] == len(tok("Push.", add_special_tokens=False)["input_ids"]) + 1
    expected = -(together[0][0] + together[1][0]) / (together[0][1] + together[1][1])
    assert abs(reply_loss(model, [short, long], tok.pad_token_id) - expected) < 1e-6
    assert torch.isfinite(torch.tensor(expected))
