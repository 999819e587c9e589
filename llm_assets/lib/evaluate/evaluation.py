"""Side-by-side evaluation of checkpoints on the same held-out data.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from llm_assets.lib.evaluate.evaluation import EvalData, EvalSettings, evaluate_model
    >>> from llm_assets.lib.posttrain.preferences import PreferencePair
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import load_model, save_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(6)]                   # sft_dataset's validation split
    >>> pairs = [PreferencePair(f"What is {i} + 1?", f"{i + 1}", f"{i + 2}", f"p#L{i}") for i in range(4)]
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> model_dir = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, model_dir)
    >>> settings = EvalSettings(perplexity_windows=4, generation_prompts=2, max_new_tokens=4)
    >>> tokens = np.arange(300, dtype=np.uint16) % len(tok)    # tokenized_shards' validation stream
    >>> data = EvalData.build(tokens, chats, pairs, tok, settings, seq_len=64)   # encoded once, for every model
    >>> figures, texts = evaluate_model(lambda: load_model(model_dir), model_dir, tok, data, settings)
    >>> figures.val_perplexity > 1, 0 <= figures.rouge_l <= 1, len(texts), figures.disk_bytes > 0
    (True, True, 2, True)

Figures per model (all computed here, on the same examples for every model):
- `val_perplexity`: next-token perplexity on evenly spaced windows of the validation token stream;
- `instruction_loss`: mean loss on the reply tokens of held-out instruction chats (chat_data.py);
- `preference_accuracy`: the reference-free rule of align.py on held-out preference pairs;
- `rouge_l`: ROUGE-L F1 (Google's `rouge-score`) of greedy generations with the model's own
  generation_config.json (what it ships: stop tokens, repetition penalty or n-gram rule) against the
  reference replies of held-out chats; `rouge_l_plain_greedy` the same without the shipped rule;
- `max_token_run`: the longest run of one repeated token in any of those generations;
  `repeating_replies`: the share of them with a word three times in a row;
- `reward_mean`: the mean reward-model score of those generations (when a reward model is given);
- `latency_ms_per_token_p50/p95`: per-prompt generation time divided by the tokens it generated;
  `tokens_per_second`: all generated tokens over all generation time (batch size 1, greedy), both
  on the first `latency_prompts` prompts (the other figures generate every prompt, batched);
- `peak_memory_bytes`: what serving costs: the largest rise of this process's resident memory over
  its level before the model was loaded, sampled every 5 ms while it was loaded and generated (CPU),
  or `torch.cuda.max_memory_allocated` (GPU);
- `parameters`, `disk_bytes` (the safetensors files).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from pydantic import Field

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.posttrain import generation, reward
from llm_assets.lib.posttrain.align import encode_pairs, preference_scores
from llm_assets.lib.posttrain.chat_data import end_token_id, prompt_ids, reply_loss
from llm_assets.lib.pretrain.model_dir import weights_bytes


class EvalSettings(Settings):
    """How much held-out data every model is scored on; the launchpad of `eval_report`. The window
    length is no setting: it is the compared models' context (`EvalData.build`'s seq_len)."""

    perplexity_windows: int = Field(32, description="Evenly spaced validation windows scored for perplexity.")
    instruction_examples: int = Field(200, description="Held-out instruction chats scored for the reply loss.")
    preference_pairs: int = Field(200, description="Held-out preference pairs scored for accuracy.")
    generation_prompts: int = Field(16, description="Held-out chats generated from (ROUGE-L, latency, samples).")
    max_new_tokens: int = Field(48, description="Tokens generated per prompt at most (greedy, with each model's "
                                                "generation_config.json).")
    samples: int = Field(3, description="Generations per model shown in the report.")
    batch_size: int = Field(64, description="Prompts generated at a time for the quality figures (ROUGE-L, "
                                            "repetition, reward); left padding changes no reply.")
    latency_prompts: int = Field(16, description="Of the generation prompts, the first this many are also generated "
                                                 "one at a time: latency per token and tokens/s of one request.")

    def validate(self) -> None:
        for name, value in self.model_dump().items():
            if value < 1:
                raise ValueError(f"{name}: must be at least 1 (got {value})")


@dataclass
class EvalData:
    windows: torch.Tensor  # (n, seq_len + 1) validation token windows
    chats: list[dict]  # encoded held-out chats (input_ids, labels)
    pairs: list[tuple[dict, dict]]  # encoded held-out preference pairs
    prompts: list[list[int]]  # generation prompts (token ids)
    prompt_chats: list[list[dict]]  # the same prompts as chat messages (for batched generation and the judge)
    references: list[str]  # their reference replies
    pad_id: int

    @classmethod
    def build(cls, tokens: np.ndarray, chats: list[list[dict]], preferences: list, tokenizer, s: EvalSettings,
              seq_len: int) -> EvalData:
        """The held-out data, encoded once for every model; seq_len (tokens per window and example)
        is the models' context."""
        from llm_assets.lib.posttrain.chat_data import encode_chat

        encoded = [e for e in (encode_chat(tokenizer, c, seq_len) for c in chats) if e is not None]
        pairs, _, _ = encode_pairs(tokenizer, preferences, seq_len)
        # generation prompts: evenly spread held-out chats whose prompt leaves room to generate, from
        # the half that generation settings were not chosen on
        picked = generation.held_out_prompts(tokenizer, chats, s.generation_prompts, generation.EVALUATION,
                                             s.max_new_tokens, seq_len)
        if not encoded or not pairs or not picked:
            raise ValueError("no held-out chat or preference pair fits in seq_len tokens")
        return cls(validation_windows(tokens, seq_len, s.perplexity_windows), encoded[: s.instruction_examples], pairs[: s.preference_pairs],
                   [prompt_ids(tokenizer, c[:-1]) for c in picked], [c[:-1] for c in picked],
                   [c[-1]["content"] for c in picked],
                   tokenizer.pad_token_id)


def validation_windows(tokens: np.ndarray, seq_len: int, n: int) -> torch.Tensor:
    """n evenly spaced windows of seq_len + 1 tokens: the same ones for every model scored."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"seq_len: the validation stream holds {len(tokens)} tokens, fewer than seq_len + 1")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[i : i + seq_len + 1] for i in starts]).astype(np.int64))


class PeakMemory:
    """Peak rise of resident memory above the level at entry (CPU), or CUDA's peak allocation."""

    def __init__(self):
        self.peak = 0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._proc, self._stop = psutil.Process(), threading.Event()
        self._base = self._proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        logits = model(input_ids=w[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return float(np.exp(total / count))


def shipped_greedy(model, tokenizer):
    """The model's generation_config.json (the model directory's shipped settings: repetition
    penalty, n-gram rule), greedy, stopping at `<|end|>` or eos."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, eos_token_id=[end_token_id(tokenizer), tokenizer.eos_token_id],
                  pad_token_id=tokenizer.pad_token_id)
    return config


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int
             ) -> tuple[list[str], list[float], int, list[list[int]]]:
    """(texts, seconds per generated token per prompt, tokens generated, reply token ids): batch
    size 1, decoding as the model's generation_config.json says (`shipped_greedy`)."""
    model.eval()
    device = next(model.parameters()).device
    config = shipped_greedy(model, tokenizer)
    config.max_new_tokens = max_new_tokens
    stop = config.eos_token_id
    per_token, generated, replies = [], 0, []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        start = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        seconds = time.perf_counter() - start
        new = out[0, len(ids):]
        n = len(new)
        generated += n
        per_token.append(seconds / max(1, n))
        replies.append([t for t in new.tolist() if t not in stop])
    return generation.reply_texts(tokenizer, replies), per_token, generated, replies


def rouge_l(predictions: list[str], references: list[str]) -> float:
    return statistics.fmean(generation.rouge_l_scores(predictions, references))


@dataclass(frozen=True)
class ModelFigures:
    """One model's row of the comparison, measured as the module docstring says."""

    val_perplexity: float  # next-token perplexity on the validation windows
    instruction_loss: float  # mean nats per reply token on the held-out chats
    preference_accuracy: float  # align.py's reference-free rule on the held-out pairs
    rouge_l: float  # ROUGE-L F1 of greedy generations (shipped generation config) against the references
    rouge_l_plain_greedy: float  # the same, plain greedy: no repetition penalty or n-gram rule
    max_token_run: int  # longest run of one repeated token in a generation (shipped config)
    repeating_replies: float  # share of generations with a word three times in a row
    reward_mean: float  # mean reward-model score of the generations (NaN without a reward model)
    empty_generations: int  # prompts the model answered with empty text
    latency_ms_per_token_p50: float  # per prompt: generation time / tokens generated
    latency_ms_per_token_p95: float
    tokens_per_second: float  # all generated tokens over all generation time
    peak_memory_bytes: int  # loading plus generation, above the level before the load
    parameters: int  # the model's (for a quantized model: what the caller passes, its source's)
    disk_bytes: int  # the safetensors files


def evaluate_model(load: Callable[[], torch.nn.Module], model_dir: Path, tokenizer, data: EvalData,
                   s: EvalSettings, parameters: int | None = None, judge: tuple | None = None
                   ) -> tuple[ModelFigures, list[str]]:
    """(figures, generated texts) of the model `load()` returns; memory is measured from before the
    load. `judge`: (reward model, its tokenizer) scoring the generations, or None."""
    with PeakMemory() as memory:  # what serving one request costs: loading plus generation, batch size 1
        model = load()
        start = time.perf_counter()
        _, per_token, n_tokens, _ = generate(model, tokenizer, data.prompts[: s.latency_prompts], s.max_new_tokens)
        gen_seconds = time.perf_counter() - start
    # the quality figures on every prompt, batched: the same greedy replies, a fraction of the time
    shipped = shipped_greedy(model, tokenizer)
    reply_ids = generation.generate_ids(model, tokenizer, data.prompt_chats, s.max_new_tokens, s.batch_size, shipped)
    texts = generation.reply_texts(tokenizer, reply_ids)
    # a model that ships plain greedy (the base model) would generate the same replies a second time
    plain = texts if generation.decodes_plain_greedy(shipped) else generation.generate_replies(
        model, tokenizer, data.prompt_chats, s.max_new_tokens, s.batch_size)
    rewards = reward.reward_scores(*judge, data.prompt_chats, texts) if judge else [math.nan]
    ppl = perplexity(model, data.windows)
    loss = reply_loss(model, data.chats, data.pad_id)
    pref = preference_scores(model, data.pairs, data.pad_id)
    latencies_ms = sorted(1000 * t for t in per_token)
    figures = ModelFigures(
        val_perplexity=ppl,
        instruction_loss=loss,
        preference_accuracy=pref.accuracy,
        rouge_l=rouge_l(texts, data.references),
        rouge_l_plain_greedy=rouge_l(plain, data.references),
        max_token_run=max(generation.max_token_run(ids) for ids in reply_ids),
        repeating_replies=sum(generation.repeats(t) for t in texts) / len(texts),
        reward_mean=statistics.fmean(rewards),
        empty_generations=sum(not t for t in texts),
        latency_ms_per_token_p50=float(np.percentile(latencies_ms, 50)),
        latency_ms_per_token_p95=float(np.percentile(latencies_ms, 95)),
        tokens_per_second=n_tokens / gen_seconds,
        peak_memory_bytes=memory.peak,
        parameters=parameters if parameters is not None else sum(p.numel() for p in model.parameters()),
        disk_bytes=weights_bytes(model_dir),
    )
    del model
    return figures, texts
