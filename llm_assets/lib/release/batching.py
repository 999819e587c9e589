r"""Continuous batching for the model server: concurrent requests share every forward pass.

    >>> import torch
    >>> from llm_assets.lib.posttrain.chat_data import prompt_ids
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.release.batching import BatchEngine, GenerationRequest, collect
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["Explain f(x). Return x + 1."] * 5, vocab_size=300)
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).eval()
    >>> engine = BatchEngine(model, tok, max_batch_size=4, max_queue=8)
    >>> asks = [GenerationRequest(prompt_ids(tok, [{"role": "user", "content": f"Explain f{i}(x)."}]), max_new_tokens=5)
    ...         for i in range(3)]
    >>> replies = collect(engine, asks)                # three requests at once, one batch
    >>> [(r.finish_reason, len(r.generated) <= 5) for r in replies]
    [('length', True), ('length', True), ('length', True)]
    >>> max(engine.batch_sizes)                        # the three shared decoding steps
    3
    >>> engine.close()

One engine thread per loaded model runs the loop; `submit` hands it a request from any thread and
returns its `Sequence`, whose `on_event(kind, value)` callback is called on the engine thread with
("text", the next piece of the reply; one piece at the end when the request does not stream), then ("done", finish reason: stop | length) or ("error",
message). `Sequence.cancel()` (a client that went away) drops it at the next step.

- Requests wait in a queue; once the batch is full, at most `max_queue` of them (past it `submit`
  raises QueueFull: the server's 429). Before a step, waiting requests join the running batch, up
  to `max_batch_size` rows.
- The requests joining at a step (the waiting ones that fit, once enough have gathered:
  `_join_now`) are prefilled together (their prompts left-padded, the padding masked): that gives
  their KV caches and first tokens. Their cache rows are left-padded to the
  batch's width and stacked under the batch's, one row per sequence (transformers' DynamicCache,
  edited per layer).
- A step feeds every row's last token at once: input (B, 1), attention mask (B, W+1) with 0 over
  each row's left padding, position ids = each row's own length, so a row's logits do not depend on
  its neighbours (up to float rounding; the tests compare greedy replies batched and alone).
- Each row's next token is chosen with its own settings, in the order transformers' generate uses:
  the model directory's generation_config (repetition_penalty, no_repeat_ngram_size, over the row's
  prompt and reply; no stop token before min_new_tokens), then temperature and top_p, sampled
  with the row's own seeded generator.
  A temperature below MIN_TEMPERATURE is greedy (dividing logits by 1e-300 overflows to inf/nan).
- A row leaves when it picks a stop token (`<|end|>`, eos, generation_config's eos ids), reaches
  max_new_tokens, its text reaches a stop string, or it is cancelled; its cache rows are dropped
  and padding columns no row needs any more are trimmed.
- A failure in a forward pass fails the requests in it (an "error" event each), not the engine.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_assets.lib.posttrain.chat_data import end_token_id

MIN_TEMPERATURE = 1e-2  # below it decoding is greedy: the distribution is a point mass anyway
# While a batch runs, waiting requests join once they ask for this share of the free places, or the
# oldest has waited this long: a prefill of four prompts cost 1.3x one (demo model, nf4, one thread),
# and an engine joining each arrival alone spent most of its time prefilling (benchmarks/serve_load.py).
JOIN_SHARE = 0.25
JOIN_WAIT_S = 0.05


class QueueFull(RuntimeError):
    """The engine's waiting queue holds max_queue requests already."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]  # the rendered prompt (chat_data.prompt_ids for chats)
    max_new_tokens: int
    temperature: float = 0.0  # below MIN_TEMPERATURE: greedy
    top_p: float = 1.0  # nucleus sampling mass; 1 = the whole distribution
    seed: int | None = None  # sampling seed; None = a random one
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings
    stream: bool = True  # report the text as it comes; False: one "text" event with all of it, at the end


class Sequence:
    """One request in the engine: its reply so far and where it reports to."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[str, object], None], engine: BatchEngine):
        self.request, self.on_event, self.engine = request, on_event, engine
        self.generated: list[int] = []  # chosen token ids, a final stop token included
        self.text = ""  # the reply decoded (stop token and special tokens left out, cut at a stop string)
        self.emitted = 0  # characters of text already sent as "text" events
        self.finish_reason: str | None = None  # stop | length | error | cancelled
        self.cancelled = False
        self.submitted = time.monotonic()
        self.sample = request.temperature >= MIN_TEMPERATURE
        self.generator = None
        if self.sample:
            self.generator = torch.Generator(engine.device)
            self.generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        # a stop string may be split over tokens: hold back that many characters until the reply ends
        self.holdback = max((len(s) for s in request.stop), default=1) - 1

    def cancel(self) -> None:
        """Stop generating for this request (thread-safe: the engine drops it at its next step)."""
        self.cancelled = True

    def choose(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's penalized scores (vocab,), record it, report, maybe finish."""
        token = self.engine.pick(self, logits)
        self.generated.append(token)
        if token in self.engine.stop_ids:
            return self.finish("stop")
        if not self.request.stream and not self.request.stop:  # the text is needed only at the end
            if len(self.generated) >= self.request.max_new_tokens:
                self.finish("length")
            return
        self.text = self.engine.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = min((i for s in self.request.stop if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0),
                  default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if len(self.generated) >= self.request.max_new_tokens:
            return self.finish("length")
        end = len(self.text) - self.holdback
        if self.text.endswith("\ufffd"):  # half a UTF-8 character: its other bytes are still to come
            end = min(end, len(self.text) - 1)
        self._emit(end)

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            self.on_event("text", self.text[self.emitted:end])
            self.emitted = end

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        if not self.request.stream and not self.request.stop:
            reply = self.generated[:-1] if reason == "stop" else self.generated  # the stop token is no text
            self.text = self.engine.tokenizer.decode(reply, skip_special_tokens=True)
        self._emit(len(self.text))
        self.on_event("done", reason)

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.on_event("error", f"{type(error).__name__}: {error}")


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, T, head_dim) or (B, T) padded with zeros on the left of T to `width`."""
    extra = width - t.shape[-2 if t.dim() == 4 else -1]
    return F.pad(t, (0, 0, extra, 0) if t.dim() == 4 else (extra, 0)) if extra else t


class QueuedEngine:
    """What the serving engines share (BatchEngine here, LlamaCppEngine in llama_engine.py): requests
    handed in from any thread (`submit`, QueueFull past `max_queue` waiting), one engine thread that
    answers them (`_loop`, the subclass's), `close`, the stop tokens and the token choice from
    `generation_config` (a transformers GenerationConfig: its repetition penalty, no-repeat n-gram
    size and eos ids). Subclasses say how many waiting requests the next step takes (`_free`) and
    what a full queue means to a client (`_full`), and call `_start` once their own state is set."""

    kind = "engine"  # named in errors

    def __init__(self, tokenizer, generation_config, device: torch.device, max_queue: int = 64,
                 on_step: Callable[[int], None] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0 (got {max_queue})")
        self.tokenizer, self.device, self.max_queue, self.on_step = tokenizer, device, max_queue, on_step
        self.penalty = float(generation_config.repetition_penalty or 1.0)
        self.ngram = int(generation_config.no_repeat_ngram_size or 0)
        self.min_new_tokens = int(generation_config.min_new_tokens or 0)
        eos = generation_config.eos_token_id
        self.stop_ids = {end_token_id(tokenizer), tokenizer.eos_token_id,
                         *([eos] if isinstance(eos, int) else list(eos or []))}
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.closed = False
        self._cond = threading.Condition()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=self.kind, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def _free(self) -> int:
        """Waiting requests the next step takes at once (under the lock)."""
        raise NotImplementedError

    def _full(self) -> str:
        raise NotImplementedError

    def submit(self, request: GenerationRequest, on_event: Callable[[str, object], None]) -> Sequence:
        if request.max_new_tokens < 1 or not request.prompt_ids:
            raise ValueError("max_new_tokens: must be at least 1, and the prompt must have a token")
        with self._cond:
            if self.closed:
                raise RuntimeError(f"the {self.kind} engine is closed")
            if len(self.waiting) >= self.max_queue + self._free():
                raise QueueFull(f"{len(self.waiting)} requests are waiting {self._full()} (the queue limit is "
                                f"{self.max_queue}); retry later")
            seq = Sequence(request, on_event, self)
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests; the thread ends once the running and waiting ones are done."""
        with self._cond:
            self.closed = True
            self._cond.notify()
        self.thread.join(timeout)

    def penalized(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float scores with generation_config's repetition penalty over each row's
        prompt and reply, all rows at once (each row padded with its own first token: a repeat
        changes nothing)."""
        from transformers import RepetitionPenaltyLogitsProcessor

        scores = logits.float()
        if self.penalty == 1.0:
            return scores
        rows = [s.request.prompt_ids + s.generated for s in seqs]
        width = max(map(len, rows))
        ids = torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], device=scores.device)
        return RepetitionPenaltyLogitsProcessor(self.penalty)(ids, scores)

    def pick(self, seq: Sequence, scores: torch.Tensor) -> int:
        """The next token for `seq` from its penalized scores (vocab,), as transformers' generate
        would: no-repeat n-grams, no stop token before min_new_tokens, then greedy, or temperature
        and top_p and a seeded draw."""
        from transformers import NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        scores = scores[None]  # (1, vocab)
        if self.ngram:
            ids = torch.tensor([seq.request.prompt_ids + seq.generated], device=scores.device)
            scores = NoRepeatNGramLogitsProcessor(self.ngram)(ids, scores)
        if len(seq.generated) < self.min_new_tokens:
            stops = torch.tensor(sorted(self.stop_ids), device=scores.device)
            scores = scores.index_fill(1, stops, float("-inf"))
        if not seq.sample:
            return int(scores.argmax())
        scores = TemperatureLogitsWarper(seq.request.temperature)(None, scores)
        if seq.request.top_p < 1.0:
            scores = TopPLogitsWarper(seq.request.top_p)(None, scores)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=seq.generator))


class BatchEngine(QueuedEngine):
    """The batching loop over one model on a thread of its own; see the module docstring."""

    kind = "batching"

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64,
                 on_step: Callable[[int], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1 (got {max_batch_size})")
        super().__init__(tokenizer, model.generation_config, next(model.parameters()).device, max_queue, on_step)
        self.model, self.max_batch_size = model.eval(), max_batch_size
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decoding steps by batch size
        self.rows: list[Sequence] = []
        self.cache = None  # transformers DynamicCache, one row per sequence in self.rows
        self.mask: torch.Tensor | None = None  # (rows, width): 1 over each row's tokens, 0 over its left padding
        self._start()

    def _free(self) -> int:
        return max(0, self.max_batch_size - len(self.rows))  # places the next step fills from the queue

    def _full(self) -> str:
        return f"for a place in a batch of {self.max_batch_size}"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.rows and not self.closed:
                    self._cond.wait()
                if self.closed and not self.waiting and not self.rows:
                    return
                joining = []
                take = self.max_batch_size - len(self.rows) if self._join_now() else 0
                while self.waiting and len(joining) < take:
                    seq = self.waiting.popleft()
                    if not seq.cancelled:
                        joining.append(seq)
            with torch.inference_mode():
                if joining:
                    self._join(joining)
                self._drop_finished()
                if self.rows:
                    self._step()

    def _join_now(self) -> bool:
        """Whether waiting requests join at this step (under the lock). A prefill costs a few
        decoding steps and costs hardly more for several prompts than for one, so while a batch
        runs, arrivals gather until JOIN_SHARE of the free places are asked for or the oldest has
        waited JOIN_WAIT_S; an idle engine takes a request at once."""
        if not self.waiting:
            return False
        free = self.max_batch_size - len(self.rows)
        return (not self.rows or len(self.waiting) >= max(1, int(free * JOIN_SHARE))
                or time.monotonic() - self.waiting[0].submitted >= JOIN_WAIT_S)

    def _join(self, seqs: list[Sequence]) -> None:
        """Prefill the joining requests together, choose their first tokens and stack their cache
        rows under the batch's. When the shared prefill fails, each is tried alone, so one bad
        request fails only itself."""
        width = max(len(s.request.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.request.prompt_ids):] = torch.tensor(s.request.prompt_ids)
            mask[i, width - len(s.request.prompt_ids):] = 1
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)  # only the last position's logits are used
        except Exception as e:
            if len(seqs) > 1:
                for s in seqs:
                    self._join([s])
            else:
                seqs[0].fail(e)
            return
        for s, logits in zip(seqs, self.penalized(seqs, out.logits[:, -1])):
            try:
                s.choose(logits)
            except Exception as e:  # a failure while picking or decoding fails its request only
                s.fail(e)
        keep = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if keep:
            self._stack(out.cache, mask, keep, [seqs[i] for i in keep])

    def _stack(self, cache, mask: torch.Tensor, keep: list[int], seqs: list[Sequence]) -> None:
        """Add rows `keep` of a prefill's cache (and its attention mask) under the batch's."""
        if len(keep) < mask.shape[0]:
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
            mask = mask[keep]
        if not self.rows:
            self.rows, self.cache, self.mask = seqs, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows = self.rows + seqs

    def _step(self) -> None:
        """One token for every row: one forward pass over the batch."""
        rows = self.rows
        tokens = torch.tensor([[s.generated[-1]] for s in rows], device=self.device)
        mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], dim=1)
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                             cache=self.cache, use_cache=True)
        except Exception as e:  # which row broke it cannot be told: every request in the step fails
            for s in rows:
                s.fail(e)
            self.rows, self.cache, self.mask = [], None, None
            return
        self.mask = mask
        self.batch_sizes[len(rows)] += 1
        if self.on_step is not None:
            self.on_step(len(rows))
        for s, logits in zip(rows, self.penalized(rows, out.logits[:, -1])):
            try:
                s.choose(logits)
            except Exception as e:  # a failure while picking or decoding fails its request only
                s.fail(e)

    def _drop_finished(self) -> None:
        """Take finished and cancelled rows out of the batch, and padding no row needs any more."""
        keep = [i for i, s in enumerate(self.rows) if s.finish_reason is None and not s.cancelled]
        for s in self.rows:
            if s.cancelled and s.finish_reason is None:
                s.finish_reason = "cancelled"
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).nonzero()[0])  # leading columns that are padding in every row
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def collect(engine: BatchEngine, requests: Seq[GenerationRequest], timeout: float = 120.0) -> list[Sequence]:
    """Submit every request at once and wait for all of them (for tests, benchmarks and scripts)."""
    done = threading.Semaphore(0)
    seqs = [engine.submit(r, lambda kind, _v: kind in ("done", "error") and done.release()) for r in requests]
    for _ in seqs:
        if not done.acquire(timeout=timeout):
            raise TimeoutError(f"no reply within {timeout} s")
    return seqs
