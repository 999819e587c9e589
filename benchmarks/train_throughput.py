"""Pretraining speed: the default (precision and compile `auto`) against fp32 eager, and the real
`pretrain.train()` loop against a bare loop of the same default.

Two ratios, each against a baseline measured in the same run:
- default / fp32 eager (target >= 2.5x at the demo size where the CPU has native bf16): the bare
  loop with PretrainSettings' precision and compile resolved as `train()` resolves them (bf16
  autocast where native, torch.compile on CUDA) and freed memory kept in the process as `train()`
  keeps it (common/memory.py), vs the same bare loop in plain fp32, eager, with glibc's default
  malloc. Each bare loop runs in a fresh process, since the malloc setting cannot be undone;
  compilation, where there is any, happens in untimed warm-up steps.
- real / bare (target >= 0.9): the loop's overhead. Both sides train the same model size with the
  same micro_batch, seq_len, autocast, compile, AdamW and clipping, on the same number of threads:

- real: `train()` end to end as configured for the demo (PretrainSettings defaults, --steps steps):
  batches drawn from the memmapped token stream, the lr schedule, loss logging, periodic evaluation
  and checkpoints. Its figure is the loop's own: tokens trained / seconds from the first step to the
  end of the last step's evaluation and checkpoint (model building and the final save_pretrained
  are outside it).
- bare: forward, cross-entropy, backward, clip, optimizer step on batches pre-loaded as tensors;
  nothing else. Half of every bare loop's steps run before the real loop and half after, so a
  change in the machine's load during the run biases no side.

The token stream is random ids (throughput does not depend on the text) with a tokenizer trained in
a second on a few stdlib modules, so the script needs nothing else. Printed: both tokens/s, the
seconds per step, and both ratios. The real loop's figure leaves out its first progress window,
which holds the warm-up and any compilation (reported separately as `first window`).

    .venv/bin/python benchmarks/train_throughput.py [--size demo] [--steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm_assets.lib.pretrain.model import MODEL_SIZES, build_model
from llm_assets.lib.common.memory import kept_freed_memory
from llm_assets.lib.common.precision import autocast_dtype, use_compile
from llm_assets.lib.pretrain.pretrain import PretrainSettings, make_optimizer, train
from llm_assets.lib.tokenizer.packing import write_streams

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_inputs(root: Path, vocab_size: int, train_tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """(tokens_dir, tokenizer_dir): random uint16 ids in the packed-shard format + a small BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f"{name}.py").read_text(encoding="utf-8") for name in ("argparse", "csv", "heapq")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                            pad_token="<|pad|>").save_pretrained(root / "tokenizer")

    tokens = root / "tokens"
    rng = np.random.default_rng(seed)
    sizes = {"train": train_tokens, "validation": max(train_tokens // 10, 100_000)}
    streams = {split: rng.integers(0, vocab_size, size=n, dtype=np.uint16) for split, n in sizes.items()}
    write_streams(tokens, streams, vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return tokens, root / "tokenizer"


def bare_loop(s: PretrainSettings, vocab_size: int, steps: int, batches: list[torch.Tensor]) -> float:
    """Seconds for `steps` optimizer steps of the bare loop (after 3 untimed warm-up steps, which
    also compile when s.compile resolves to on), in a fresh process of its own (see `in_child`)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(in_child, s, vocab_size, steps, batches).result()


def in_child(s: PretrainSettings, vocab_size: int, steps: int, batches: list[torch.Tensor]) -> float:
    """bare_loop's body. A process of its own, because the default keeps freed memory in the process
    (common/memory.py, as train() does) and that malloc setting cannot be undone for the baseline."""
    torch.set_num_threads(s.num_threads)
    default = (s.precision, s.compile) != ("fp32", "off")
    with kept_freed_memory() if default else contextlib.nullcontext():
        return timed_loop(s, vocab_size, steps, batches)


def timed_loop(s: PretrainSettings, vocab_size: int, steps: int, batches: list[torch.Tensor]) -> float:
    torch.manual_seed(s.seed)
    raw = build_model(s.size, vocab_size, 0, 1, 2)
    optimizer, _ = make_optimizer(raw, s)
    cpu = torch.device("cpu")
    amp_dtype = autocast_dtype(s.precision, cpu)
    model = torch.compile(raw) if use_compile(s.compile, cpu) else raw

    def step(i: int) -> None:
        for micro in range(s.grad_accum):
            w = batches[(i * s.grad_accum + micro) % len(batches)]  # (micro_batch, seq_len + 1)
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(input_ids=w[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
            (loss / s.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return time.perf_counter() - t0


def steady_rate(history: list[dict]) -> tuple[float, float]:
    """(tokens/s after the first progress window, tokens/s of the first window) of train()'s rows."""
    rows = [r for r in history if "tokens_per_second" in r]
    later = rows[1:] or rows
    return sum(r["tokens_per_second"] for r in later) / len(later), rows[0]["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", help="model size (settings otherwise the demo's)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each loop")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the stream")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    demo, cpu = PretrainSettings(), torch.device("cpu")
    s = PretrainSettings(size=args.size, max_steps=args.steps, num_threads=args.threads,
                         seq_len=min(demo.seq_len, MODEL_SIZES[args.size].context),
                         warmup_steps=min(demo.warmup_steps, args.steps - 1),
                         compile="on" if use_compile(demo.compile, cpu) else "off")
    s.validate()
    fp32 = s.model_copy(update={"precision": "fp32", "compile": "off"})
    tokens_per_step = s.micro_batch * s.grad_accum * s.seq_len
    half = args.steps // 2
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        root = Path(tmp)
        tokens_dir, tokenizer_dir = make_inputs(root, args.vocab, train_tokens=2_000_000)
        rng = np.random.default_rng(1)
        batches = [torch.from_numpy(rng.integers(0, args.vocab, (s.micro_batch, s.seq_len + 1)))
                   for _ in range(8)]

        fp32_seconds = bare_loop(fp32, args.vocab, half, batches)
        bare_seconds = bare_loop(s, args.vocab, half, batches)
        history = []
        train(s, tokens_dir, tokenizer_dir, root / "work", root / "out",
              log=lambda e: history.append(e) if e["event"] == "train" else None)
        bare_seconds += bare_loop(s, args.vocab, args.steps - half, batches)
        fp32_seconds += bare_loop(fp32, args.vocab, args.steps - half, batches)

    fp32_tps, bare_tps = (args.steps * tokens_per_step / t for t in (fp32_seconds, bare_seconds))
    real_tps, first_tps = steady_rate(history)
    print(f"size={s.size} micro_batch={s.micro_batch} grad_accum={s.grad_accum} seq_len={s.seq_len} "
          f"steps={args.steps} threads={args.threads} eval_every={s.eval_every} eval_batches={s.eval_batches} "
          f"checkpoint_every={s.checkpoint_every} log_every={s.log_every}")
    print(f"default = precision {s.precision} -> {autocast_dtype(s.precision, cpu) or 'fp32'}, "
          f"compile {demo.compile} -> {s.compile}, freed memory kept in the process")
    print(f"bare loop, fp32 eager: {fp32_tps:9.1f} tokens/s  {tokens_per_step / fp32_tps:.3f} s/step")
    print(f"bare loop, default:    {bare_tps:9.1f} tokens/s  {tokens_per_step / bare_tps:.3f} s/step")
    print(f"real train(), default: {real_tps:9.1f} tokens/s  {tokens_per_step / real_tps:.3f} s/step "
          f"(first window, with warm-up and any compilation: {first_tps:.1f} tokens/s)")
    speedup, overhead = bare_tps / fp32_tps, real_tps / bare_tps
    print(f"ratio default/fp32 eager: {speedup:.3f}  (target >= 2.5: {'met' if speedup >= 2.5 else 'NOT met'})")
    print(f"ratio real/bare:          {overhead:.3f}  (target >= 0.9: {'met' if overhead >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
