r"""Chats as token ids for causal-LM fine-tuning and scoring: the prompt masked, the reply trained.

    >>> from llm_assets.lib.posttrain.chat_data import encode_chat, pad_batch, reply_loss
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["Explain f(). Return 1."] * 5, vocab_size=300)
    >>> chat = [{"role": "user", "content": "Explain f()."}, {"role": "assistant", "content": "Return 1."}]
    >>> ex = encode_chat(tok, chat, max_len=256)
    >>> tok.decode(ex["input_ids"])
    '<|eos|><|user|>Explain f().<|end|>\n<|assistant|>Return 1.<|end|>'
    >>> tok.decode([i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100])  # what trains
    'Return 1.<|end|>'
    >>> encode_chat(tok, chat, max_len=5) is None          # too long: dropped, never cut
    True
    >>> short = encode_chat(tok, [chat[0], {"role": "assistant", "content": "1"}], max_len=256)
    >>> batch = pad_batch([ex, short], tok.pad_token_id)  # input_ids, attention_mask, labels as tensors
    >>> tuple(batch["input_ids"].shape), batch["attention_mask"].sum(dim=1).tolist()
    ((2, 13), [13, 10])
    >>> model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    >>> 4 < reply_loss(model, [ex, short], tok.pad_token_id) < 7   # untrained: about ln(vocab) = 5.6 nats
    True

A sequence is `<eos> prompt reply <|end|>`: the leading eos is the document boundary the base model
saw between pretraining documents (the packed stream has no bos), the prompt is the tokenizer's chat
template up to and including the generation prompt (`<|assistant|>`), and the reply is the final
assistant turn's text followed by `<|end|>`, the token generation stops at. Loss is taken on the
reply and `<|end|>` only, so the model learns to answer and to stop, not to echo instructions.

Byte-level BPE never merges across a special token, so tokenizing the reply on its own gives the
same ids as tokenizing the rendered chat as a whole (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # labels the loss skips (transformers' and torch's convention)
END_TOKEN = "<|end|>"  # closes every chat turn; generation stops on it


def end_token_id(tokenizer) -> int:
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {END_TOKEN!r} token; it was not trained by llm_assets.lib.tokenizer.tokenizer")
    return end


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """`<eos>` + the chat template over `messages` with the generation prompt appended."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def reply_ids(tokenizer, reply: str) -> list[int]:
    return [*tokenizer(reply, add_special_tokens=False)["input_ids"], end_token_id(tokenizer)]


def encode_prompt_reply(tokenizer, messages: Sequence[dict], reply: str, max_len: int) -> dict | None:
    """input_ids and labels of a prompt (messages ending in a user turn) and its reply; None when
    the whole does not fit in max_len (a cut reply would teach the model never to stop)."""
    prompt, answer = prompt_ids(tokenizer, messages), reply_ids(tokenizer, reply)
    if len(prompt) + len(answer) > max_len:
        return None
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_chat(tokenizer, messages: Sequence[dict], max_len: int) -> dict | None:
    """A chat whose last message is the assistant reply to train on (see encode_prompt_reply)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant reply")
    return encode_prompt_reply(tokenizer, messages[:-1], messages[-1]["content"], max_len)


def pad_batch(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids (pad_id), attention_mask (0 on padding), labels (-100)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PadCollator:
    """`Trainer` data collator over encode_chat examples (a class: picklable for data workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_id)


@torch.no_grad()
def reply_logprobs(model, examples: Sequence[dict], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed log-probability of the labelled tokens, their count) per example, in order."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i : i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        keep = targets != IGNORE_INDEX
        sums = (picked * keep).sum(-1)
        out.extend(zip(sums.tolist(), keep.sum(-1).tolist()))
    return out


def reply_loss(model, examples: Sequence[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over all reply tokens of `examples`: the held-out SFT loss."""
    scored = reply_logprobs(model, examples, pad_id, batch_size)
    return -sum(s for s, _ in scored) / sum(n for _, n in scored)
