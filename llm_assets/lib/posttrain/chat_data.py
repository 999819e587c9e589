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
    >>> tok.decode(encode_chat(tok, chat, max_len=11)["input_ids"])  # too long: the prompt's start cut
    '<|eos|><|user|>().<|end|>\n<|assistant|>Return 1.<|end|>'
    >>> encode_chat(tok, chat, max_len=5) is None          # not even the chat's frame fits: dropped
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

A prompt and reply longer than max_len are truncated, not dropped (`fit`), as TRL does with
max_length: the prompt loses its oldest turns (a leading system message stays: it sets the task)
and then, when its last turn alone is too long, the start of that turn's text; the reply keeps what
the prompt leaves, never less than half of max_len (when it is that long), and is cut at its end,
losing `<|end|>`: a cut reply must not teach the model to stop mid-sentence. Only an example whose
chat frame alone does not fit is dropped. Dialogues of public preference sets (HH-RLHF) often run
past a 256-token budget; their last turns are the ones the reply answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # labels the loss skips (transformers' and torch's convention)
END_TOKEN = "<|end|>"  # closes every chat turn; generation stops on it
# When prompt and reply are both long, the reply keeps at least this share of max_len (TRL's DPO
# defaults were max_prompt_length 512 of max_length 1024): the reply is what trains.
MIN_REPLY_SHARE = 0.5
EXAMPLES = 5  # too-long examples named in metadata


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


@dataclass(frozen=True)
class Fitted:
    """A prompt and its replies truncated to fit max_len tokens (each reply with the prompt)."""

    prompt: list[dict]  # the messages: oldest turns dropped, then the start of the last one's text cut, when needed
    prompt_ids: list[int]
    reply_ids: list[list[int]]  # each reply + `<|end|>`, cut at its end (losing `<|end|>`) beyond the budget
    replies: list[str]  # each reply's text as kept
    truncated: bool  # anything was cut

    def example(self, k: int = 0) -> dict:
        """input_ids and labels (the prompt masked) of prompt + reply k."""
        reply = self.reply_ids[k]
        return {"input_ids": self.prompt_ids + reply, "labels": [IGNORE_INDEX] * len(self.prompt_ids) + reply}


def _cut_start(tokenizer, head: list[dict], last: dict, budget: int) -> tuple[list[dict], list[int]] | None:
    """`head + [last]` with the start of last's text cut so the prompt fits in budget tokens."""
    frame = len(prompt_ids(tokenizer, [*head, {**last, "content": ""}]))
    ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    # Re-tokenizing a decoded suffix can take a token more than it had: retry a few tokens shorter.
    for keep in range(budget - frame, max(0, budget - frame - 8), -1):
        text = tokenizer.decode(ids[len(ids) - keep:]).lstrip("\ufffd")  # no half UTF-8 character first
        messages = [*head, {**last, "content": text}]
        out = prompt_ids(tokenizer, messages)
        if len(out) <= budget:
            return messages, out
    return None


def truncate_prompt(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], list[int]] | None:
    """(messages, their prompt ids) within `budget` tokens: the oldest turns dropped, so the prompt
    still opens with a user turn (a leading system message kept), then the start of the last turn's
    text cut; None when even an empty last turn does not fit."""
    head = list(messages[:1]) if messages[0]["role"] == "system" and len(messages) > 1 else []
    turns = list(messages[len(head):])
    ids = prompt_ids(tokenizer, head + turns)
    while len(ids) > budget and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        ids = prompt_ids(tokenizer, head + turns)
    if len(ids) <= budget:
        return head + turns, ids
    return _cut_start(tokenizer, head, turns[-1], budget)


def fit(tokenizer, messages: Sequence[dict], replies: Sequence[str], max_len: int) -> Fitted | None:
    """The prompt (messages ending in a user turn) and replies, each reply with the prompt within
    max_len tokens: untouched when they fit, else truncated (module docstring); None when not even
    the prompt's frame fits. One prompt for all replies: a preference pair's sides stay comparable."""
    prompt, answers = prompt_ids(tokenizer, messages), [reply_ids(tokenizer, r) for r in replies]
    longest = max(map(len, answers))
    if len(prompt) + longest <= max_len:
        return Fitted(list(messages), prompt, answers, list(replies), False)
    keep = min(longest, max(max_len - len(prompt), math.ceil(max_len * MIN_REPLY_SHARE)))  # the longest reply's tokens
    cut = truncate_prompt(tokenizer, list(messages), max_len - keep)
    if cut is None:
        return None
    room = max_len - len(cut[1])  # at least `keep`: dropping whole turns can free more
    kept = [a[:room] for a in answers]
    # a cut reply's text (for TRL's RewardTrainer) ends on a whole character
    texts = [r if len(a) == len(k) else tokenizer.decode(k).rstrip("\ufffd") for r, a, k in zip(replies, answers, kept)]
    return Fitted(cut[0], cut[1], kept, texts, True)


def encode_prompt_reply(tokenizer, messages: Sequence[dict], reply: str, max_len: int) -> dict | None:
    """input_ids and labels of a prompt (messages ending in a user turn) and its reply, truncated to
    max_len (`fit`); None when it cannot be."""
    fitted = fit(tokenizer, messages, [reply], max_len)
    return fitted.example() if fitted else None


def encode_chat(tokenizer, messages: Sequence[dict], max_len: int) -> dict | None:
    """A chat whose last message is the assistant reply to train on (see encode_prompt_reply)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant reply")
    return encode_prompt_reply(tokenizer, messages[:-1], messages[-1]["content"], max_len)


@dataclass
class TooLong:
    """Examples longer than max_len, by source ("file#Lline", "doc::qualname"): truncated to fit, or
    dropped when not even their frame fits."""

    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def add(self, source: str, fitted: Fitted | None) -> None:
        if fitted is None:
            self.dropped.append(source)
        elif fitted.truncated:
            self.truncated.append(source)

    def __iadd__(self, other: TooLong) -> TooLong:
        self.truncated += other.truncated
        self.dropped += other.dropped
        return self

    def examples(self) -> str:
        """The first few of each, for metadata: 'truncated 3: a, b, c; dropped 0'."""
        def few(names: list[str]) -> str:
            more = f" (+{len(names) - EXAMPLES} more)" if len(names) > EXAMPLES else ""
            return f"{len(names)}" + (f": {', '.join(names[:EXAMPLES])}{more}" if names else "")
        return f"truncated {few(self.truncated)}; dropped {few(self.dropped)}"


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
