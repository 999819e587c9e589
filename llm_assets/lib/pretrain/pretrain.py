r"""Pretraining: a Llama-style model from scratch on packed token shards; resumable, DDP-ready.

    python -m llm_assets.lib.pretrain.pretrain --settings settings.json --tokens DIR --tokenizer DIR \
        --work DIR --out DIR
    torchrun --standalone --nproc_per_node 2 -m llm_assets.lib.pretrain.pretrain ...   # DDP, gloo on CPU

`--tokens`: train.bin and validation.bin (flat token ids, documents separated by eos) + meta.json;
`--tokenizer`: a transformers tokenizer dir; `--settings`: JSON of `PretrainSettings` fields.
The same trainer in-process, on a tiny model for four steps:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.pretrain.pretrain import PretrainSettings, train
    >>> from llm_assets.lib.tokenizer.packing import write_streams
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> root = Path(tempfile.mkdtemp())
    >>> texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)]
    >>> tok = train_tokenizer(texts, vocab_size=300)
    >>> _ = tok.save_pretrained(root / "tokenizer")
    >>> ids = [i for text in texts for i in [*tok.encode(text), tok.eos_token_id]]
    >>> _ = write_streams(root / "tokens", {"train": ids[:-100], "validation": ids[-100:]}, len(tok),
    ...                   tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    >>> settings = PretrainSettings(size="tiny", seq_len=32, micro_batch=4, max_steps=4, warmup_steps=1,
    ...                             eval_every=0, eval_batches=1, checkpoint_every=0, log_every=2)
    >>> events = []
    >>> final = train(settings, root / "tokens", root / "tokenizer", root / "work", root / "out", log=events.append)
    >>> [e["event"] for e in events]
    ['start', 'train', 'train', 'eval', 'checkpoint', 'done']
    >>> final.steps, final.tokens_seen, final.val_perplexity > 1
    (4, 512, True)
    >>> sorted(p.name for p in (root / "out").iterdir() if not p.name.startswith("tokenizer"))
    ['chat_template.jinja', 'config.json', 'final_metrics.json', 'generation_config.json', 'loss_curve.png', 'metrics.jsonl', 'model.safetensors', 'training_config.json']

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationError

from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.common.memory import kept_freed_memory
from llm_assets.lib.common.precision import PRECISIONS, autocast_dtype, use_compile
from llm_assets.lib.pretrain.checkpoints import resume, run_hash, save_checkpoint
from llm_assets.lib.pretrain.model_dir import save_model
from llm_assets.lib.pretrain.model import MODEL_SIZES, build_model, count_parameters
from llm_assets.lib.common.report import loss_curve_png
from llm_assets.lib.pretrain.run_metrics import (PretrainMetrics, ProgressWindow, baseline_and_estimates, peak_flops,
                                                  run_metrics)
from llm_assets.lib.common.settings import Settings
from llm_assets.lib.tokenizer import packing
from llm_assets.lib.tokenizer.tokenizer import load_tokenizer

# Fields that change how a run is watched, not what it computes: editing them keeps checkpoints.
OPERATIONAL_FIELDS = ("log_every", "checkpoint_every", "num_threads")


class PretrainSettings(Settings):
    """What a pretraining run computes and how it is watched; the launchpad of `base_checkpoint`."""

    size: str = Field("demo", description=f"Model size dial, a key of model.MODEL_SIZES: {' | '.join(MODEL_SIZES)} "
                                          "(tiny = tests, demo = make demo, large = real use on a GPU).")
    seq_len: int = Field(256, description="Tokens per training window; at most the model size's context.")
    micro_batch: int = Field(8, description="Windows per forward/backward pass, per rank (DDP process).")
    grad_accum: int = Field(1, description="Micro-batches summed into one optimizer step.")
    max_steps: int = Field(500, description="Optimizer steps. Tokens per step = world size x micro_batch x "
                                            "grad_accum x seq_len (the demo: 500 x 2,048 = 1.02 M tokens).")
    lr: float = Field(2e-3, description="Peak AdamW learning rate, reached at the end of warmup, then cosine decay.")
    min_lr_ratio: float = Field(0.1, description="The cosine ends at lr x min_lr_ratio on the last step.")
    warmup_steps: int = Field(20, description="Steps of linear warmup from lr / warmup_steps up to lr.")
    weight_decay: float = Field(0.1, description="AdamW decoupled weight decay on >=2-D weights (not norms).")
    grad_clip: float = Field(1.0, description="Maximum global gradient L2 norm (0 = no clipping).")
    eval_every: int = Field(50, description="Steps between validation evaluations (0 = only after the last step).")
    eval_batches: int = Field(4, description="Validation micro-batches per evaluation (the same windows each time).")
    checkpoint_every: int = Field(50, description="Steps between resumable checkpoints in the work dir "
                                                  "(0 = only after the last step).")
    log_every: int = Field(10, description="Steps between progress rows (train loss, lr, tokens/s).")
    seed: int = Field(1337, description="Seeds the initialization and every batch, so a resumed run sees the same data.")
    precision: str = Field("auto", description="auto (bf16 autocast where the device computes bf16 natively: CPUs "
                                               "with AMX or AVX512-BF16, bf16 GPUs; else fp32) | fp32 | bf16.")
    compile: str = Field("auto", description="torch.compile the training step: auto (on CUDA only: on a CPU it measured "
                                             "no faster than eager, after ~1 min of compiling) | on | off.")
    num_threads: int = Field(0, description="torch CPU threads per process (0 = torch's default).")

    @classmethod
    def from_dict(cls, values: dict) -> PretrainSettings:
        """Settings from JSON (the --settings file): types are strict, errors name the field."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: unknown setting(s); known: {list(cls.model_fields)}")
        try:
            settings = cls.model_validate(values, strict=True)  # strict: "0.1" is no float, True no int
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{first['loc'][0]}: {first['msg']} (got {first['input']!r})") from None
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the first offending field."""
        kinds = {int: (int,), float: (int, float), str: (str,)}  # also after an assignment
        for name, f in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds[f.annotation]):
                raise ValueError(f"{name}: expected {f.annotation.__name__}, got {value!r}")

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
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.compile in ("auto", "on", "off"), "compile", "must be auto, on or off")


def load_training_tokens(tokens_dir: Path, seq_len: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {"train": memmap, "validation": memmap}) read by packing's reader (which checks the
    files against meta.json), then checked for what training needs: a window fits in every split
    and every id is inside the vocabulary."""
    meta = packing.read_meta(tokens_dir)
    splits = {}
    for split in ("train", "validation"):
        tokens = packing.load_tokens(tokens_dir, split)
        if len(tokens) < seq_len + 1:
            raise ValueError(f"seq_len: {split}.bin holds {len(tokens)} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; lower seq_len or add {split} data")
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


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank among `world` DDP processes (1 without torchrun), its
    device, the autocast dtype (None = plain fp32) and whether the training step is compiled."""

    world: int
    rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    compiled: bool

    @classmethod
    def from_environment(cls, s: PretrainSettings) -> Runtime:
        """From torchrun's WORLD_SIZE, RANK and LOCAL_RANK; selects the CUDA device and sets the CPU
        thread count."""
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if s.num_threads:
            torch.set_num_threads(s.num_threads)
        return cls(world, rank, device, autocast_dtype(s.precision, device), use_compile(s.compile, device))

    def amp(self):
        """A fresh autocast context per use; a no-op for fp32."""
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)

    def distribute(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` wrapped in DDP when there are several processes, else `model` itself."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None  # CPU modules take no device ids
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # fixed (micro_batch, seq_len) shapes: one compilation serves the whole run
        return torch.compile(model) if self.compiled else model


def load_inputs(tokens_dir: Path, tokenizer_dir, seq_len: int):
    """(meta, {"train", "validation"} token memmaps, tokenizer), the tokenizer checked against the
    shards' meta.json."""
    meta, data = load_training_tokens(tokens_dir, seq_len)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > meta["vocab_size"] or tokenizer.eos_token_id != meta["eos_token_id"]:
        raise ValueError(f"tokenizer_dir: {len(tokenizer)} tokens, eos {tokenizer.eos_token_id}; "
                         f"meta.json says vocab_size {meta['vocab_size']}, eos {meta['eos_token_id']}")
    return meta, data, tokenizer


def optimizer_step(model, raw, optimizer, scheduler, tokens: np.ndarray, s: PretrainSettings, step: int,
                   rt: Runtime, window_loss: torch.Tensor) -> float:
    """One optimizer step over grad_accum micro-batches of this rank; adds the step's loss to
    `window_loss` in place and returns the lr the step used. `model` may be the DDP wrapper of `raw`."""
    for micro in range(s.grad_accum):
        x, y = train_batch(tokens, s, step, rt.rank, micro)  # (micro_batch, seq_len)
        # Accumulating micro-batches skip DDP's all-reduce; the last one syncs the sum.
        quiet = rt.world > 1 and micro < s.grad_accum - 1
        with model.no_sync() if quiet else contextlib.nullcontext():
            with rt.amp():
                logits = model(input_ids=x.to(rt.device)).logits  # (B, T, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(rt.device).flatten())
            (loss / s.grad_accum).backward()
        window_loss += loss.detach() / s.grad_accum  # no .item(): no GPU sync per step
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def write_outputs(out_dir: Path, model, tokenizer, config: dict, history: list[dict], final: PretrainMetrics):
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)  # config.json, generation_config.json, model.safetensors
        (tmp / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        (tmp / "final_metrics.json").write_text(json.dumps(asdict(final), indent=2))
        loss_curve_png(history, math.log(final.unigram_perplexity), tmp / "loss_curve.png")


def train(settings: PretrainSettings, tokens_dir, tokenizer_dir, work_dir, out_dir,
          log: Callable[[dict], None] | None = None) -> PretrainMetrics:
    """Pretrain (or resume), write out_dir on rank 0 and return the final metrics. Every rank
    returns the loss and throughput figures; rank 0 adds the baseline, MFU and the estimates."""
    from transformers.utils import logging as hf_logging

    t_start = time.perf_counter()
    s = settings
    s.validate()
    tokens_dir, work_dir, out_dir = Path(tokens_dir), Path(work_dir), Path(out_dir)
    meta, data, tokenizer = load_inputs(tokens_dir, tokenizer_dir, s.seq_len)
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would clutter the JSON lines
    rt = Runtime.from_environment(s)
    log = log or (lambda event: print(json.dumps(event), flush=True))
    emit = log if rt.rank == 0 else (lambda event: None)  # one voice: rank 0
    if rt.world > 1:
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(s.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        raw = build_model(s.size, meta["vocab_size"], meta["bos_token_id"],
                          meta["eos_token_id"], meta["pad_token_id"]).to(rt.device)
        optimizer, scheduler = make_optimizer(raw, s)
        n_params = count_parameters(raw)
        wanted = {k: v for k, v in s.model_dump().items() if k not in OPERATIONAL_FIELDS}
        run_id = run_hash(wanted, meta, tokens_dir, rt.world) if rt.rank == 0 else ""
        start_step, history, tokens_seen = resume(work_dir, run_id, rt.rank, rt.world, rt.device, raw,
                                                  optimizer, scheduler, emit)
        model = rt.distribute(raw)  # `raw`, the plain module: checkpoints, evaluation and outputs use it

        tokens_per_step = rt.world * s.micro_batch * s.grad_accum * s.seq_len
        val_starts = eval_starts(len(data["validation"]), s)
        emit({"event": "start", "parameters": n_params, "device": str(rt.device), "world_size": rt.world,
              "autocast": str(rt.amp_dtype), "compiled": rt.compiled, "tokens_per_step": tokens_per_step,
              "from_step": start_step, "max_steps": s.max_steps})
        peak_before = peak_flops(s, rt, meta["vocab_size"]) if rt.rank == 0 else 0.0
        window = ProgressWindow(rt.device)
        loop_t0 = window.t0
        with kept_freed_memory():  # each step reallocates its activations: reuse them, do not page-fault
            for step in range(start_step, s.max_steps):
                lr = optimizer_step(model, raw, optimizer, scheduler, data["train"], s, step, rt, window.loss)
                done, last = step + 1, step + 1 == s.max_steps
                tokens_seen += tokens_per_step
                window.steps += 1
                if done % s.log_every == 0 or last:
                    history.append(window.row(done, lr, tokens_seen, tokens_per_step, rt.world))
                    emit({"event": "train", **history[-1]})
                if (s.eval_every and done % s.eval_every == 0) or last:
                    val_loss = evaluate(raw, data["validation"], val_starts, s, rt.device, rt.amp, rt.rank, rt.world)
                    history.append({"step": done, "tokens_seen": tokens_seen, "val_loss": val_loss,
                                    "val_perplexity": math.exp(val_loss)})
                    emit({"event": "eval", **history[-1]})
                if ((s.checkpoint_every and done % s.checkpoint_every == 0) or last) and rt.rank == 0:
                    state = {"step": done, "tokens_seen": tokens_seen, "run_hash": run_id,
                             "settings": s.model_dump(), "world_size": rt.world, "history": history}
                    path = save_checkpoint(work_dir, raw, optimizer, scheduler, state)
                    emit({"event": "checkpoint", "step": done, "path": str(path)})
        loop_seconds = time.perf_counter() - loop_t0
        trained = (s.max_steps - start_step) * tokens_per_step  # in this session, all ranks

        final = run_metrics(history, s, tokens_seen, trained, loop_seconds, n_params, start_step)
        if rt.rank == 0:
            final = replace(final, **baseline_and_estimates(final, data, val_starts, meta, s, rt,
                                                                  peak_before))
            final = replace(final, wall_seconds=time.perf_counter() - t_start)
            config = {"settings": s.model_dump(), "model_config": raw.config.to_dict(),
                      "data_meta": meta, "world_size": rt.world, "device": str(rt.device),
                      "autocast": str(rt.amp_dtype), "compiled": rt.compiled, "run_hash": run_id}
            write_outputs(out_dir, raw, tokenizer, config, history, final)
            emit({"event": "done", **asdict(final)})
        if rt.world > 1:
            dist.barrier()  # no rank exits (tearing the group down) before rank 0 has written
        return final
    finally:
        if rt.world > 1:
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
