r"""Batched generation from chat prompts, repetition figures, and the decoding settings a model
directory ships (generation_config.json), chosen on held-out ROUGE-L.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from transformers import GenerationConfig
    >>> from llm_assets.lib.posttrain.generation import (candidate_grid, choose_generation_config, decodes_plain_greedy,
    ...                                                  generate_replies, greedy_config, max_token_run, repeats,
    ...                                                  write_generation_config)
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(4)]                       # held-out chats: prompt turns, reference reply
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    >>> replies = generate_replies(model, tok, [chat[:-1] for chat in chats], max_new_tokens=6, batch_size=2)
    >>> len(replies), all(isinstance(r, str) for r in replies)   # greedy, in prompt order
    (4, True)
    >>> max_token_run([5, 7, 7, 7, 2]), repeats("the the the end"), repeats("the end, the end")
    (3, True, False)
    >>> grid = candidate_grid(penalties=(1.0, 1.3), ngram_sizes=(0, 3))
    >>> config, rows = choose_generation_config(model, tok, chats, 6, grid)
    >>> len(rows), sorted(rows[0]), config.do_sample, config.min_new_tokens
    (4, ['longest_token_run', 'mean_reply_chars', 'no_repeat_ngram_size', 'repeats_share', 'repetition_penalty', 'rouge_l'], False, 1)
    >>> decodes_plain_greedy(greedy_config(tok, 6)), decodes_plain_greedy(config)   # a shipped config has a rule
    (True, False)
    >>> model_dir = Path(tempfile.mkdtemp())
    >>> write_generation_config(model_dir, config)
    >>> GenerationConfig.from_pretrained(model_dir).eos_token_id == config.eos_token_id
    True

Prompts are rendered as `chat_data.prompt_ids` renders them (`<eos>` + chat template + the
generation prompt `<|assistant|>`), left-padded so every row's next token sits in the last column,
and batched in order of length (less padding); replies come back in the caller's order. Generation
stops at `<|end|>` or eos; a reply is the text before the first stop token, special tokens removed.
Left padding changes no reply: the attention mask hides the pads and positions start at each
row's first real token (checked in the tests against one-at-a-time generation).

`choose_generation_config` decodes held-out chats greedily with each candidate setting and keeps
the one with the best mean ROUGE-L F1 (Google's `rouge-score`, stemmed, as eval_report scores);
of equal scores the one whose longest run of one token is shortest, then the simplest: the lowest
repetition penalty, then no n-gram rule, then the largest n (which forbids the fewest
continuations). The chosen config also suppresses the stop tokens at the first position, so a
reply is never empty. Pass chats distinct from the ones the model is later evaluated on, or the
chosen setting is fitted to the test.
"""

from __future__ import annotations

import copy
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from llm_assets.lib.common.precision import autocast_dtype
from llm_assets.lib.common.settings import Settings
from llm_assets.lib.posttrain.chat_data import end_token_id, prompt_ids
from llm_assets.lib.pretrain.model_dir import context_length, load_model

GENERATION_CONFIG = "generation_config.json"
PENALTIES = (1.0, 1.1, 1.2, 1.3, 1.5)  # repetition_penalty candidates; 1.0 = off
NGRAM_SIZES = (0, 3, 4)  # no_repeat_ngram_size candidates; 0 = no rule
MIN_REPLY_TOKENS = 1  # a shipped config never ends a reply before its first token: an empty answer helps no one
_WORD = re.compile(r"\w+")


def greedy_config(tokenizer, max_new_tokens: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                  min_new_tokens: int = 0):
    """A greedy GenerationConfig stopping at `<|end|>` or eos (not before min_new_tokens tokens),
    padding with the tokenizer's pad."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                            no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
                            eos_token_id=[end_token_id(tokenizer), tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def decodes_plain_greedy(config) -> bool:
    """True when a GenerationConfig decodes as greedy_config's defaults do: greedy, none of the rules
    a shipped config may add (repetition penalty, n-gram rule, minimum length). A base model's
    saved config is one."""
    return (not config.do_sample and (config.repetition_penalty or 1.0) == 1.0
            and not config.no_repeat_ngram_size and not config.min_new_tokens)


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(rows), longest row), padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _until_stop(new_ids: list[int], stop: set[int]) -> list[int]:
    """The generated ids before the first stop token (after it, generate pads the row)."""
    for k, t in enumerate(new_ids):
        if t in stop:
            return new_ids[:k]
    return new_ids


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[Sequence[dict]], max_new_tokens: int, batch_size: int = 16,
                 generation_config=None, precision: str = "fp32") -> list[list[int]]:
    """The reply token ids (stop token excluded) per prompt, in order; see generate_replies."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size: must be at least 1 (got {max_new_tokens}, {batch_size})")
    config = copy.deepcopy(generation_config) if generation_config is not None else greedy_config(tokenizer, max_new_tokens)
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = tokenizer.pad_token_id
    stop = {end_token_id(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id}
    model.eval()
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    rendered = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in rendered]
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        ids, mask = _left_padded([rendered[i] for i in picked], tokenizer.pad_token_id)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)
        for row, i in enumerate(picked):
            out[i] = _until_stop(generated[row, ids.shape[1]:].tolist(), stop)
    return out


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
                     generation_config=None, precision: str = "fp32") -> list[str]:
    """The model's reply to each prompt (messages ending in a user turn), in order: greedy unless
    `generation_config` (a transformers GenerationConfig) says otherwise, at most max_new_tokens
    tokens, stopped at `<|end|>`/eos, decoded without special tokens and stripped. `precision`
    (fp32, bf16, auto: common/precision.py) sets matmul autocast; the weights stay as loaded."""
    return reply_texts(tokenizer, generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size,
                                               generation_config, precision))


def reply_texts(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Each reply's text: its token ids decoded without special tokens, stripped."""
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


def sample_replies(model, tokenizer, prompts: list[list[dict]], samples: int, temperature: float,
                   max_new_tokens: int, batch_size: int = 16, seed: int = 0, precision: str = "fp32") -> list[list[str]]:
    """`samples` replies per prompt drawn at `temperature` (plain ancestral sampling: no top-k or
    top-p, so the replies are the model's own distribution), stopped and decoded as generate_replies
    does; out[i] answers prompts[i]. Seeded: the same call (prompts, batch size) returns the same replies."""
    if samples < 1 or temperature <= 0:
        raise ValueError(f"samples and temperature: must be positive (got {samples}, {temperature})")
    config = greedy_config(tokenizer, max_new_tokens)
    config.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    torch.manual_seed(seed)
    flat = generate_replies(model, tokenizer, [p for p in prompts for _ in range(samples)], max_new_tokens,
                            batch_size, config, precision)
    return [flat[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (Google's `rouge-score`, stemmed): the
    one scorer of generation settings, ranked preference pairs and eval_report."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"references: {len(references)} references for {len(predictions)} predictions")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def max_token_run(token_ids: Sequence[int]) -> int:
    """The longest run of one token repeated back to back (0 for no tokens)."""
    best, run = 0, 0
    for k, t in enumerate(token_ids):
        run = run + 1 if k and t == token_ids[k - 1] else 1
        best = max(best, run)
    return best


def repeats(text: str, n: int = 3) -> bool:
    """True when some word (a run of letters, digits, `_`; case-blind) comes n times in a row:
    "the the the" is the loop small models fall into."""
    if n < 2:
        raise ValueError(f"n: must be at least 2 (got {n})")
    words = _WORD.findall(text.lower())
    run = 1
    for k in range(1, len(words)):
        run = run + 1 if words[k] == words[k - 1] else 1
        if run >= n:
            return True
    return False


def candidate_grid(penalties: Sequence[float] = PENALTIES, ngram_sizes: Sequence[int] = NGRAM_SIZES) -> list[dict]:
    """Every (repetition_penalty, no_repeat_ngram_size) pair, as keyword dicts for greedy_config."""
    return [{"repetition_penalty": float(p), "no_repeat_ngram_size": int(n)} for p in penalties for n in ngram_sizes]


def _simplicity(candidate: dict) -> tuple:
    """Sort key, simplest first: lowest penalty, then no n-gram rule, then the largest n."""
    n = candidate["no_repeat_ngram_size"]
    return candidate["repetition_penalty"], n != 0, -n


def choose_generation_config(model, tokenizer, chats: list[list[dict]], max_new_tokens: int,
                             candidates: list[dict], batch_size: int = 16, precision: str = "fp32"):
    """(the best greedy GenerationConfig, one row per candidate): each candidate (keywords of
    greedy_config) decodes every chat's prompt (all turns but the last) and is scored by mean
    ROUGE-L F1 against the chat's last (reference) reply; rows carry the score, the share of
    replies with a word 3x in a row, the longest run of one token in any reply and the mean reply
    length in characters. Every shipped config generates at least MIN_REPLY_TOKENS tokens."""
    if not chats or not candidates:
        raise ValueError("choose_generation_config: needs at least one chat and one candidate")
    for k, chat in enumerate(chats):
        if len(chat) < 2 or chat[-1]["role"] != "assistant":
            raise ValueError(f"chats[{k}]: must end with the reference assistant reply after a prompt")
    prompts, references = [chat[:-1] for chat in chats], [chat[-1]["content"] for chat in chats]
    rows = []
    for cand in sorted(candidates, key=_simplicity):
        config = greedy_config(tokenizer, max_new_tokens, **cand, min_new_tokens=MIN_REPLY_TOKENS)
        ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, config, precision)
        replies = reply_texts(tokenizer, ids)
        score = statistics.fmean(rouge_l_scores(replies, references))
        rows.append({**cand, "rouge_l": score, "repeats_share": statistics.fmean(map(repeats, replies)),
                     "longest_token_run": max(map(max_token_run, ids)),
                     "mean_reply_chars": statistics.fmean(map(len, replies))})
    best_score = max(r["rouge_l"] for r in rows)
    # Of the best (within float noise), the one that loops least, then the simplest (rows are in
    # simplicity order, min keeps the first): a model too weak to score any ROUGE-L still gets
    # the rule that stops its loops.
    best = min((r for r in rows if r["rouge_l"] >= best_score - 1e-12), key=lambda r: r["longest_token_run"])
    knobs = {k: best[k] for k in ("repetition_penalty", "no_repeat_ngram_size")}
    return greedy_config(tokenizer, max_new_tokens, **knobs, min_new_tokens=MIN_REPLY_TOKENS), rows


EVALUATION, TUNING = 0, 1  # the two disjoint halves of held_out_prompts


class TuningSettings(Settings):
    """How a fine-tuned model directory's generation_config.json is chosen (lora_checkpoint and
    aligned_checkpoint): greedy decoding with each candidate rule on held-out prompts, by ROUGE-L."""

    tuning_prompts: int = Field(24, description="Held-out chats the decoding rule is chosen on (the half eval_report "
                                                "does not generate from).")
    tuning_max_new_tokens: int = Field(48, description="Tokens generated per tuning prompt at most.")
    repetition_penalties: list[float] = Field([1.0, 1.2, 1.5], description="Candidate repetition penalties (1 = off).")
    no_repeat_ngram_sizes: list[int] = Field([0, 3], description="Candidate no_repeat_ngram_size values (0 = no rule).")


def tune_model_dir(model_dir: Path, chats: list[list[dict]], s: TuningSettings) -> tuple[object, list[dict]]:
    """Choose the decoding rule of the model in `model_dir` on the TUNING half of `chats` (held-out
    chats ending in the reference reply) and write it as the directory's generation_config.json;
    returns (the config, one row per candidate)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    picked = held_out_prompts(tokenizer, chats, s.tuning_prompts, TUNING, s.tuning_max_new_tokens,
                              context_length(model_dir))
    if not picked:
        raise ValueError(f"tuning_prompts: no held-out chat leaves room for {s.tuning_max_new_tokens} new tokens")
    config, rows = choose_generation_config(load_model(model_dir), tokenizer, picked, s.tuning_max_new_tokens,
                                            candidate_grid(s.repetition_penalties, s.no_repeat_ngram_sizes))
    write_generation_config(model_dir, config)
    return config, rows


def held_out_prompts(tokenizer, chats: list[list[dict]], n: int, part: int, max_new_tokens: int,
                     context: int) -> list[list[dict]]:
    """n evenly spread held-out chats whose prompt leaves room for max_new_tokens in `context`,
    from one of two disjoint halves: EVALUATION (even positions) is what eval_report generates
    from, TUNING (odd) what choose_generation_config chooses on, so the choice is not fitted to
    the test."""
    usable = [c for c in chats if len(prompt_ids(tokenizer, c[:-1])) + max_new_tokens <= context]
    half = usable[part::2]
    return [half[i * len(half) // n] for i in range(min(n, len(half)))]


def write_generation_config(model_dir: Path, config) -> None:
    """`model_dir/generation_config.json`, replaced atomically (written beside it, then renamed)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    tmp = model_dir / f".{GENERATION_CONFIG}.{os.getpid()}.tmp"
    try:
        config.to_json_file(tmp)
        os.replace(tmp, model_dir / GENERATION_CONFIG)
    finally:
        tmp.unlink(missing_ok=True)
