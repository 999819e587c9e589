"""The figures of a pretraining run: the progress rows, the metrics train() returns, and the
baselines they are judged by (the unigram model, the matmul peak behind MFU, the seed formulas).

    >>> import numpy as np
    >>> from llm_assets.lib.pretrain.run_metrics import unigram_perplexity
    >>> train = np.array([0, 0, 0, 1], dtype=np.uint16)  # counts 3 and 1, add-one: p = 4/6, 2/6
    >>> round(unigram_perplexity(train, np.array([0, 1]), vocab_size=2), 4)  # exp(-(ln 4/6 + ln 2/6) / 2)
    2.1213
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from llm_assets.lib.pretrain.model import (MODEL_SIZES, estimate_parameters, matmul_peak_flops, matmul_shapes,
                                           training_flops, training_memory_bytes)

if TYPE_CHECKING:  # annotations only: pretrain.py imports this module
    from llm_assets.lib.pretrain.pretrain import PretrainSettings, Runtime


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `targets` of the add-one-smoothed unigram model of the train split."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(train_tokens), 1 << 24):  # 16M-token chunks bound bincount's int64 copy
        counts += np.bincount(train_tokens[i : i + (1 << 24)], minlength=vocab_size)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(np.exp(-log_p[targets].mean()))


@dataclass(frozen=True)
class PretrainMetrics:
    """What train() returns, rank 0 writes to final_metrics.json and the Pipes worker reports as the
    asset's metadata, in this order. Every rank fills the loss and throughput figures; the baseline,
    MFU and the estimates are rank 0's (None on the other ranks)."""

    train_loss: float  # mean training loss (nats/token) of the last progress window
    val_loss: float  # validation loss (nats/token) of the last evaluation, after the last step
    val_perplexity: float  # exp(val_loss)
    tokens_seen: int  # training tokens of the whole run, all ranks, resumed steps included
    tokens_per_second: float  # this session's training tokens (all ranks) per second of the step loop
    parameters: int  # of the model trained
    steps: int  # optimizer steps of the run (max_steps)
    resumed_from_step: int  # the checkpoint step this session started from; 0 = from scratch
    unigram_perplexity: float | None = None  # the baseline: add-one unigram model of train, same tokens
    perplexity_vs_unigram: float | None = None  # val_perplexity / unigram_perplexity
    matmul_peak_flops: float | None = None  # fastest dense matmul in the compute dtype, before or after training, x world
    mfu: float | None = None  # 6 · parameters · tokens_per_second / matmul_peak_flops
    estimated_parameters: int | None = None  # from the shape alone (model.estimate_parameters)
    memory_bytes: int | None = None  # training memory estimate: fp32 AdamW, 16 bytes per parameter
    compute_flops: float | None = None  # training compute estimate: 6 · estimated_parameters · tokens_seen
    wall_seconds: float | None = None  # from the start of train() to just before the outputs are written


class ProgressWindow:
    """The training loss and throughput of the steps since the last progress row."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)  # summed step losses, kept on the device
        self.steps = 0
        self.t0 = time.perf_counter()

    def row(self, step: int, lr: float, tokens_seen: int, tokens_per_step: int, world: int) -> dict:
        """The progress row at `step` (loss averaged over the window's steps and the ranks); starts
        the next window."""
        if world > 1:
            dist.all_reduce(self.loss)
            self.loss /= world
        now = time.perf_counter()
        row = {"step": step, "train_loss": self.loss.item() / self.steps, "lr": lr, "tokens_seen": tokens_seen,
               "tokens_per_second": tokens_per_step * self.steps / (now - self.t0)}
        self.loss.zero_()
        self.steps, self.t0 = 0, now  # eval/checkpoint time lands in the next window
        return row


def run_metrics(history: list[dict], s: PretrainSettings, tokens_seen: int, trained: int, loop_seconds: float,
                parameters: int, start_step: int) -> PretrainMetrics:
    """The figures every rank returns: the last losses, the tokens and the throughput."""
    last_train = next(r for r in reversed(history) if "train_loss" in r)
    val_loss = next(r["val_loss"] for r in reversed(history) if "val_loss" in r)
    return PretrainMetrics(
        train_loss=last_train["train_loss"], val_loss=val_loss, val_perplexity=math.exp(val_loss),
        tokens_seen=tokens_seen,
        # a finished run picked up again trains nothing: report its last window's rate
        tokens_per_second=trained / loop_seconds if trained else last_train["tokens_per_second"],
        parameters=parameters, steps=s.max_steps, resumed_from_step=start_step)


def peak_flops(s: PretrainSettings, rt: Runtime, vocab_size: int) -> float:
    """This process's matmul peak in the compute dtype over the model's own shapes (model.py)."""
    shapes = matmul_shapes(MODEL_SIZES[s.size], vocab_size, s.micro_batch * s.seq_len)
    return matmul_peak_flops(rt.device, rt.amp_dtype or torch.float32, seconds=0.6, shapes=shapes)


def baseline_and_estimates(final: PretrainMetrics, data: dict[str, np.ndarray], val_starts: np.ndarray,
                           meta: dict, s: PretrainSettings, rt: Runtime, peak_before: float) -> dict:
    """Rank 0's figures: the unigram baseline, MFU and the seed-formula estimates. `peak_before`:
    peak_flops measured before the loop; the peak is the larger of it and one measured now."""
    targets = np.concatenate([data["validation"][i + 1 : i + s.seq_len + 1]
                              for i in val_starts])  # what evaluate() scored
    unigram = unigram_perplexity(data["train"], targets, meta["vocab_size"])
    # mfu: 6·N·tokens/s over the fastest matmul measured here (same dtype as training, the model's
    # shapes and two squares, before and after the loop), times world: not a datasheet peak, and one
    # the loop cannot beat: a shared machine only makes MFU read low. 6·N ignores attention.
    peak = rt.world * max(peak_before, peak_flops(s, rt, meta["vocab_size"]))
    # Seed-formula estimates: parameters from the shape, AdamW fp32 memory, 6·N·D compute.
    estimate = estimate_parameters(MODEL_SIZES[s.size], meta["vocab_size"])
    return {"unigram_perplexity": unigram, "perplexity_vs_unigram": final.val_perplexity / unigram,
            "matmul_peak_flops": peak, "mfu": 6 * final.parameters * final.tokens_per_second / peak,
            "estimated_parameters": estimate, "memory_bytes": training_memory_bytes(estimate),
            "compute_flops": training_flops(estimate, final.tokens_seen)}
