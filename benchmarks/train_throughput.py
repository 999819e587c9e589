"""Pretraining loop overhead: tokens/s of the real `pretrain.train()` vs a bare training loop.

Both sides train the same model size with the same micro_batch, seq_len, autocast, AdamW and
clipping, on the same number of threads:

- real: `train()` end to end as configured for the demo (PretrainSettings defaults, --steps steps):
  batches drawn from the memmapped token stream, the lr schedule, loss logging, periodic evaluation
  and checkpoints. Its figure is the loop's own: tokens trained / seconds from the first step to the
  end of the last step's evaluation and checkpoint (model building and the final save_pretrained
  are outside it).
- bare: forward, cross-entropy, backward, clip, optimizer step on batches pre-loaded as tensors;
  nothing else. Half of its steps run before the real loop and half after, so a change in the
  machine's load during the run biases neither side.

The token stream is random ids (throughput does not depend on the text) with a tokenizer trained in
a second on a few stdlib modules, so the script needs nothing else. Printed: both tokens/s, the
seconds per step, and the ratio real/bare (target ≥ 0.9).

    .venv/bin/python benchmarks/train_throughput.py [--size demo] [--steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm_assets.lib.pretrain.model import MODEL_SIZES, build_model
from llm_assets.lib.pretrain.pretrain import PretrainSettings, autocast_dtype, make_optimizer, train
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
    """Seconds for `steps` optimizer steps of the bare loop (after 2 untimed warm-up steps)."""
    torch.manual_seed(s.seed)
    model = build_model(s.size, vocab_size, 0, 1, 2)
    optimizer, _ = make_optimizer(model, s)
    amp_dtype = autocast_dtype(s.precision, torch.device("cpu"))

    def step(i: int) -> None:
        for micro in range(s.grad_accum):
            w = batches[(i * s.grad_accum + micro) % len(batches)]  # (micro_batch, seq_len + 1)
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(input_ids=w[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
            (loss / s.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", help="model size (settings otherwise the demo's)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each loop")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the stream")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    demo = PretrainSettings()
    s = PretrainSettings(size=args.size, max_steps=args.steps, num_threads=args.threads,
                         seq_len=min(demo.seq_len, MODEL_SIZES[args.size].context),
                         warmup_steps=min(demo.warmup_steps, args.steps - 1))
    s.validate()
    tokens_per_step = s.micro_batch * s.grad_accum * s.seq_len
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        root = Path(tmp)
        tokens_dir, tokenizer_dir = make_inputs(root, args.vocab, train_tokens=2_000_000)
        rng = np.random.default_rng(1)
        batches = [torch.from_numpy(rng.integers(0, args.vocab, (s.micro_batch, s.seq_len + 1)))
                   for _ in range(8)]

        bare_seconds = bare_loop(s, args.vocab, args.steps // 2, batches)
        real = train(s, tokens_dir, tokenizer_dir, root / "work", root / "out", log=lambda e: None)
        bare_seconds += bare_loop(s, args.vocab, args.steps - args.steps // 2, batches)

    bare_tps = args.steps * tokens_per_step / bare_seconds
    real_tps = real.tokens_per_second
    print(f"size={s.size} micro_batch={s.micro_batch} grad_accum={s.grad_accum} seq_len={s.seq_len} "
          f"steps={args.steps} threads={args.threads} precision={s.precision} "
          f"eval_every={s.eval_every} eval_batches={s.eval_batches} "
          f"checkpoint_every={s.checkpoint_every} log_every={s.log_every}")
    print(f"real train() loop: {real_tps:9.1f} tokens/s  {tokens_per_step / real_tps:.3f} s/step")
    print(f"bare loop:         {bare_tps:9.1f} tokens/s  {tokens_per_step / bare_tps:.3f} s/step")
    ratio = real_tps / bare_tps
    print(f"ratio real/bare:   {ratio:.3f}  (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
