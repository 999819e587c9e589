"""Pretraining: a Llama-style model from scratch on packed token shards; resumable, DDP-ready.

    python -m llm_assets.lib.pretrain.pretrain --settings settings.json --tokens DIR --tokenizer DIR \\
        --work DIR --out DIR
    torchrun --standalone --nproc_per_node 2 -m llm_assets.lib.pretrain.pretrain ...   # DDP, gloo on CPU

`--tokens`: train.bin and validation.bin (flat token ids, documents separated by eos) + meta.json;
`--tokenizer`: a transformers tokenizer dir; `--settings`: JSON of `PretrainSettings` fields.

1. Settings and data are checked before anything trains; errors name the field or file.
2. A batch is random windows of seq_len+1 tokens from the memmap, drawn by a generator seeded with
   (seed, step, rank, micro_step): no loader state, so a resumed run sees the same batches.
3. AdamW (decay on ≥2-D weights), linear warmup + cosine decay, clipping, accumulation, autocast.
4. Evaluation on fixed, evenly spaced validation windows; the baseline is an add-one unigram model
   of the train split scored on the same tokens.
5. Checkpoints in `--work` (atomic, latest kept) carry a hash of settings + data; a run resumes
   from the latest only if the hash matches, else it starts over and says so.
6. `--out`: the model (safetensors) and tokenizer, training_config.json, metrics.jsonl,
   final_metrics.json and loss_curve.png.

Progress goes out as JSON lines (or to any `log` callable: `llm_assets.workers.pretrain` runs this
same trainer under Dagster Pipes). One run per work dir at a time; DDP ranks share one filesystem.
Checkpointing lives in `checkpoints.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.pretrain.checkpoints import resume, run_hash, save_checkpoint
from llm_assets.lib.pretrain.model import (MODEL_SIZES, build_model, count_parameters, estimate_parameters,
                                  matmul_peak_flops, training_flops, training_memory_bytes)
from llm_assets.lib.common.report import loss_curve_png

# Fields that change how a run is watched, not what it computes: editing them keeps checkpoints.
OPERATIONAL_FIELDS = ("log_every", "checkpoint_every", "num_threads")


@dataclass
class PretrainSettings:
    size: str = "demo"  # model size, a key of model.MODEL_SIZES: tiny | demo | large
    seq_len: int = 256  # tokens per training window; at most the model's context
    micro_batch: int = 8  # windows per forward/backward pass, per rank
    grad_accum: int = 1  # micro-batches summed into one optimizer step
    max_steps: int = 250  # optimizer steps; tokens/step = world·micro_batch·grad_accum·seq_len
    lr: float = 2e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine ends at lr × min_lr_ratio on the last step
    warmup_steps: int = 20  # steps of linear warmup from lr / warmup_steps up to lr
    weight_decay: float = 0.1  # AdamW decoupled decay on ≥2-D weights (not norms)
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    eval_every: int = 50  # steps between validation evaluations; 0 = only after the last step
    eval_batches: int = 4  # validation micro-batches per evaluation (the same windows each time)
    checkpoint_every: int = 50  # steps between checkpoints in work_dir; 0 = only after the last
    log_every: int = 10  # steps between progress rows (train loss, lr, tokens/s)
    seed: int = 1337  # seeds the initialization and every batch
    precision: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32) | fp32 | bf16
    num_threads: int = 0  # torch CPU threads per process; 0 keeps torch's default

    @classmethod
    def from_dict(cls, values: dict) -> PretrainSettings:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: unknown setting(s); known: "
                             f"{[f.name for f in fields(cls)]}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the first offending field."""
        kinds = {"int": (int,), "float": (int, float), "str": (str,)}  # annotations are strings
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, kinds[f.type]):
                raise ValueError(f"{f.name}: expected {f.type}, got {value!r}")

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {rule} (got {getattr(self, name)!r})")

        need(self.size in MODEL_SIZES, "size", f"must be one of {sorted(MODEL_SIZES)}")
        context = MODEL_SIZES[self.size].context
        need(1 <= self.seq_len <= context, "seq_len", f"must be 1..{context}, the model's context")
        for name in ("micro_batch", "grad_accum", "max_steps", "eval_batches", "log_every"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("eval_every", "checkpoint_every", "num_threads", "weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(0 <= self.warmup_steps < self.max_steps, "warmup_steps", "must be in [0, max_steps)")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "must be auto, fp32 or bf16")


def load_tokens(tokens_dir: Path, seq_len: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {"train": memmap, "validation": memmap}) after checking each promise of the format."""
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"tokens_dir: no meta.json in {tokens_dir}")
    meta = json.loads(meta_path.read_text())
    missing = {"dtype", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"} - set(meta)
    if missing:
        raise ValueError(f"meta.json: missing {sorted(missing)} in {meta_path}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"meta.json dtype: must be uint16 or uint32, got {meta['dtype']!r}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # the format is little-endian on any host
    splits = {}
    for split in ("train", "validation"):
        path = tokens_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"tokens_dir: no {split}.bin in {tokens_dir}")
        n, rest = divmod(path.stat().st_size, dtype.itemsize)
        if n == 0 or rest:
            raise ValueError(f"tokens_dir: {split}.bin is empty or not whole {meta['dtype']} "
                             f"tokens ({path.stat().st_size} bytes)")
        if n < seq_len + 1:
            raise ValueError(f"seq_len: {split}.bin holds {n} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; lower seq_len or add {split} data")
        said = meta.get("splits", {}).get(split, {}).get("tokens")
        if said is not None and said != n:
            raise ValueError(f"meta.json splits.{split}.tokens: says {said}, {split}.bin holds {n}")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        top = int(tokens.max())  # one sequential pass; an out-of-range id would crash mid-run
        if top >= meta["vocab_size"]:
            raise ValueError(f"meta.json vocab_size: {split}.bin holds id {top} >= "
                             f"{meta['vocab_size']}")
        splits[split] = tokens
    return meta, splits


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    """Inputs and next-token targets, both int64 (len(starts), seq_len)."""
    w = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def train_batch(tokens: np.ndarray, s: PretrainSettings, step: int, rank: int, micro: int):
    """The micro-batch of (step, rank, micro): a pure function of those numbers and the seed."""
    rng = np.random.default_rng([s.seed, step, rank, micro])
    return windows(tokens, rng.integers(0, len(tokens) - s.seq_len, size=s.micro_batch), s.seq_len)


def eval_starts(n_tokens: int, s: PretrainSettings) -> np.ndarray:
    """eval_batches × micro_batch window starts spread evenly over the split (no overlap when the
    split is long enough); the same every evaluation, every run, every world size."""
    return np.linspace(0, n_tokens - s.seq_len - 1, s.eval_batches * s.micro_batch).astype(np.int64)


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `targets` of the add-one-smoothed unigram model of the train split."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(train_tokens), 1 << 24):  # 16M-token chunks bound bincount's int64 copy
        counts += np.bincount(train_tokens[i : i + (1 << 24)], minlength=vocab_size)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(np.exp(-log_p[targets].mean()))


def lr_factor(step: int, s: PretrainSettings) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - 1 - s.warmup_steps))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, s: PretrainSettings):
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # embeddings and linear weights
    vectors = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains: decay shrinks them
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=s.lr, betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, s))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32). bf16 on CPU only when asked: it is fast only where
    the CPU has bf16 instructions (AVX512-BF16, AMX) and emulated, slower, elsewhere."""
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise ValueError("precision: bf16 requested but this GPU does not support it")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and bf16_ok):
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate(model, tokens, starts, s: PretrainSettings, device, amp, rank: int, world: int):
    """Mean next-token loss (nats) over the windows at `starts`, split across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (summed nats, tokens)
    mine = starts[rank::world]
    for i in range(0, len(mine), s.micro_batch):
        x, y = windows(tokens, mine[i : i + s.micro_batch], s.seq_len)
        with amp():
            logits = model(input_ids=x.to(device)).logits  # (B, T, vocab)
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                    reduction="sum")
        total[1] += y.numel()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def write_outputs(out_dir: Path, model, tokenizer, config: dict, history: list[dict], final: dict):
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2))
        loss_curve_png(history, math.log(final["unigram_perplexity"]), tmp / "loss_curve.png")


def train(settings: PretrainSettings, tokens_dir, tokenizer_dir, work_dir, out_dir,
          log: Callable[[dict], None] | None = None) -> dict:
    """Pretrain (or resume), write out_dir on rank 0 and return the final metrics. Every rank
    returns the loss and throughput figures; rank 0 adds the baseline, MFU and the estimates."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    t_start = time.perf_counter()
    s = settings
    s.validate()
    tokens_dir, work_dir, out_dir = Path(tokens_dir), Path(work_dir), Path(out_dir)
    meta, data = load_tokens(tokens_dir, s.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > meta["vocab_size"] or tokenizer.eos_token_id != meta["eos_token_id"]:
        raise ValueError(f"tokenizer_dir: {len(tokenizer)} tokens, eos {tokenizer.eos_token_id}; "
                         f"meta.json says vocab_size {meta['vocab_size']}, eos {meta['eos_token_id']}")
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would clutter the JSON lines

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    amp_dtype = autocast_dtype(s.precision, device)

    def amp():  # a fresh autocast context per use; a no-op for fp32
        return torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)

    log = log or (lambda event: print(json.dumps(event), flush=True))
    emit = log if rank == 0 else (lambda event: None)  # one voice: rank 0
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        torch.manual_seed(s.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        model = build_model(s.size, meta["vocab_size"], meta["bos_token_id"],
                            meta["eos_token_id"], meta["pad_token_id"]).to(device)
        optimizer, scheduler = make_optimizer(model, s)
        n_params = count_parameters(model)
        wanted = {k: v for k, v in asdict(s).items() if k not in OPERATIONAL_FIELDS}
        run_id = run_hash(wanted, meta, tokens_dir, world) if rank == 0 else ""
        start_step, history, tokens_seen = resume(work_dir, run_id, rank, world, device, model,
                                                  optimizer, scheduler, emit)
        raw = model  # the plain module: checkpoints, evaluation and outputs use it
        if world > 1:
            ids = [device.index] if cuda else None  # CPU modules take no device ids
            model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)

        tokens_per_step = world * s.micro_batch * s.grad_accum * s.seq_len
        val_starts = eval_starts(len(data["validation"]), s)
        emit({"event": "start", "parameters": n_params, "device": str(device), "world_size": world,
              "autocast": str(amp_dtype), "tokens_per_step": tokens_per_step,
              "from_step": start_step, "max_steps": s.max_steps})
        window_loss, window_steps = torch.zeros((), device=device), 0
        loop_t0 = window_t0 = time.perf_counter()
        for step in range(start_step, s.max_steps):
            for micro in range(s.grad_accum):
                x, y = train_batch(data["train"], s, step, rank, micro)  # (micro_batch, seq_len)
                # Accumulating micro-batches skip DDP's all-reduce; the last one syncs the sum.
                quiet = world > 1 and micro < s.grad_accum - 1
                with model.no_sync() if quiet else contextlib.nullcontext():
                    with amp():
                        logits = model(input_ids=x.to(device)).logits  # (B, T, vocab)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
                    (loss / s.grad_accum).backward()
                window_loss += loss.detach() / s.grad_accum  # no .item(): no GPU sync per step
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done, last = step + 1, step + 1 == s.max_steps
            tokens_seen += tokens_per_step
            window_steps += 1

            if done % s.log_every == 0 or last:
                if world > 1:
                    dist.all_reduce(window_loss)
                    window_loss /= world
                now = time.perf_counter()
                row = {"step": done, "train_loss": window_loss.item() / window_steps, "lr": lr,
                       "tokens_seen": tokens_seen,
                       "tokens_per_second": tokens_per_step * window_steps / (now - window_t0)}
                history.append(row)
                emit({"event": "train", **row})
                window_loss.zero_()
                window_steps, window_t0 = 0, now  # eval/checkpoint time lands in the next window
            if (s.eval_every and done % s.eval_every == 0) or last:
                val_loss = evaluate(raw, data["validation"], val_starts, s, device, amp, rank,
                                    world)
                row = {"step": done, "tokens_seen": tokens_seen, "val_loss": val_loss,
                       "val_perplexity": math.exp(val_loss)}
                history.append(row)
                emit({"event": "eval", **row})
            if ((s.checkpoint_every and done % s.checkpoint_every == 0) or last) and rank == 0:
                state = {"step": done, "tokens_seen": tokens_seen, "run_hash": run_id,
                         "settings": asdict(s), "world_size": world, "history": history}
                path = save_checkpoint(work_dir, raw, optimizer, scheduler, state)
                emit({"event": "checkpoint", "step": done, "path": str(path)})
        loop_seconds = time.perf_counter() - loop_t0
        trained = (s.max_steps - start_step) * tokens_per_step  # in this session, all ranks

        last_train = next(r for r in reversed(history) if "train_loss" in r)
        val_loss = next(r["val_loss"] for r in reversed(history) if "val_loss" in r)
        final = {"train_loss": last_train["train_loss"], "val_loss": val_loss,
                 "val_perplexity": math.exp(val_loss), "tokens_seen": tokens_seen,
                 # a finished run picked up again trains nothing: report its last window's rate
                 "tokens_per_second": trained / loop_seconds if trained
                 else last_train["tokens_per_second"],
                 "parameters": n_params, "steps": s.max_steps, "resumed_from_step": start_step}
        if rank == 0:
            targets = np.concatenate([data["validation"][i + 1 : i + s.seq_len + 1]
                                      for i in val_starts])  # what evaluate() scored
            final["unigram_perplexity"] = unigram_perplexity(data["train"], targets,
                                                             meta["vocab_size"])
            final["perplexity_vs_unigram"] = final["val_perplexity"] / final["unigram_perplexity"]
            # mfu: 6·N·tokens/s over the FLOP/s of a dense matmul measured now, in the compute
            # dtype, on rank 0's device, times world: not a datasheet peak; 6·N ignores attention.
            peak = world * matmul_peak_flops(device, amp_dtype or torch.float32)
            final["matmul_peak_flops"] = peak
            final["mfu"] = 6 * n_params * final["tokens_per_second"] / peak
            # Seed-formula estimates: parameters from the shape, AdamW fp32 memory, 6·N·D compute.
            estimate = estimate_parameters(MODEL_SIZES[s.size], meta["vocab_size"])
            final["estimated_parameters"] = estimate
            final["memory_bytes"] = training_memory_bytes(estimate)
            final["compute_flops"] = training_flops(estimate, tokens_seen)
            final["wall_seconds"] = time.perf_counter() - t_start
            config = {"settings": asdict(s), "model_config": raw.config.to_dict(),
                      "data_meta": meta, "world_size": world, "device": str(device),
                      "autocast": str(amp_dtype), "run_hash": run_id}
            write_outputs(out_dir, raw, tokenizer, config, history, final)
            emit({"event": "done", **final})
        if world > 1:
            dist.barrier()  # no rank exits (tearing the group down) before rank 0 has written
        return final
    finally:
        if world > 1:
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> tuple[PretrainSettings, dict]:
    """(settings, train() path arguments) from the command line shared by every entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="JSON file of PretrainSettings fields")
    parser.add_argument("--tokens", required=True, help="train.bin, validation.bin, meta.json")
    parser.add_argument("--tokenizer", required=True, help="transformers tokenizer directory")
    parser.add_argument("--work", required=True, help="checkpoint directory (resumed from)")
    parser.add_argument("--out", required=True, help="final model directory")
    args = parser.parse_args(argv)
    settings = PretrainSettings.from_dict(json.loads(Path(args.settings).read_text()))
    return settings, dict(tokens_dir=args.tokens, tokenizer_dir=args.tokenizer, work_dir=args.work,
                          out_dir=args.out)


def main(argv: list[str] | None = None) -> None:
    settings, paths = parse_args(argv)
    train(settings, **paths)


if __name__ == "__main__":
    main()
