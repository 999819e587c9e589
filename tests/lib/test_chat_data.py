import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.lib.posttrain.chat_data import (IGNORE_INDEX, END_TOKEN, encode_chat, encode_prompt_reply, pad_batch,
                                      reply_logprobs, reply_loss)

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


def test_too_long_examples_are_dropped_not_cut(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    n = len(encode_chat(tok, CHAT, max_len=256)["input_ids"])
    assert encode_chat(tok, CHAT, max_len=n) is not None
    assert encode_chat(tok, CHAT, max_len=n - 1) is None


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
