"""Quantized inference: generation latency, peak memory, size and perplexity of the fp32 model and
each bitsandbytes variant (nf4, int8), measured in one run; ratios against fp32.

The model is `--model DIR` (default: the demo's aligned model, data/lake/aligned_checkpoint/merged,
after `make demo`). Each variant is quantized and saved first, then loaded from disk (as a release is)
in its own subprocess, so peak memory (the rise of resident memory from before the load, sampled
every 5 ms, while loading and generating) includes neither the quantization step nor the others. Each
generates `--tokens` tokens greedily from the same prompts (batch size 1; generation is forced to
the full length so every variant produces the same number of tokens) and is scored for perplexity
on the same validation windows when `--tokens-dir` holds validation.bin (default: the demo's).

Goal (issue 5): the default variant (nf4) is <= 0.5x the fp32 size with perplexity within +5%.

    .venv/bin/python benchmarks/quantized_inference.py [--model DIR] [--tokens 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "nf4", "int8")


def measure(variant: str, model_dir: Path, tokens_dir: Path, n_tokens: int, n_prompts: int) -> dict:
    """Runs in a fresh process: load, generate, score."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from llm_assets.lib.evaluate import evaluation
    from llm_assets.lib.pretrain.model_dir import load_model, weights_bytes
    from llm_assets.lib.release import quantize
    from llm_assets.lib.tokenizer import packing

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with evaluation.PeakMemory() as memory:  # what serving costs: loading the saved model, generating
        model = load_model(model_dir) if variant == "fp32" else quantize.load_quantized(model_dir)
        disk = weights_bytes(model_dir)
        prompts = [torch.tensor([[tok.eos_token_id, *tok(f"def function_{i}(x):", add_special_tokens=False)["input_ids"]]])
                   for i in range(n_prompts)]
        latencies = []
        with torch.no_grad():
            model.generate(prompts[0], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            for x in prompts:
                start = time.perf_counter()
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens,
                                     min_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                latencies.append((time.perf_counter() - start) / (out.shape[1] - x.shape[1]))
    row = {"variant": variant, "disk_bytes": disk, "memory_footprint_bytes": model.get_memory_footprint(),
           "peak_memory_bytes": memory.peak, "ms_per_token_p50": 1000 * float(np.percentile(latencies, 50)),
           "ms_per_token_p95": 1000 * float(np.percentile(latencies, 95))}
    if packing.split_path(tokens_dir, "validation").is_file():
        stream = packing.load_tokens(tokens_dir, "validation")
        seq_len = min(256, model.config.max_position_embeddings)
        row["val_perplexity"] = evaluation.perplexity(model, evaluation.validation_windows(stream, seq_len, 32))
    return row


def main() -> None:
    from llm_assets.lib.common.paths import ProjectPaths
    from llm_assets.lib.pretrain.model_dir import merged_dir, weights_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=merged_dir(ProjectPaths(ROOT).artifact("aligned_checkpoint")))
    parser.add_argument("--tokens-dir", type=Path, default=ProjectPaths(ROOT).artifact("tokenized_shards"))
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args.variant, args.model, args.tokens_dir, args.tokens, args.prompts)))
        return
    if not weights_file(args.model).is_file():
        sys.exit(f"{args.model}: no model.safetensors; run `make demo` first or pass --model DIR")
    from llm_assets.lib.release import quantize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"fp32": args.model}
        for variant in VARIANTS[1:]:  # quantized once, saved, then loaded like a release
            dirs[variant] = Path(tmp) / variant
            dirs[variant].mkdir()
            quantize.quantize(args.model, dirs[variant], variant)
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", str(dirs[variant]),
                                   "--tokens-dir", str(args.tokens_dir), "--tokens", str(args.tokens),
                                   "--prompts", str(args.prompts)], capture_output=True, text=True, check=True)
            rows.append(json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:]))
    base = rows[0]
    keys = ["disk_bytes", "memory_footprint_bytes", "peak_memory_bytes", "ms_per_token_p50", "ms_per_token_p95"]
    if "val_perplexity" in base:
        keys.append("val_perplexity")
    print(f"model: {args.model}  ({args.prompts} prompts x {args.tokens} tokens, batch size 1, greedy)")
    print(f"{'variant':<8}" + "".join(f"{k:>24}" for k in keys))
    for row in rows:
        print(f"{row['variant']:<8}" + "".join(f"{row[k]:>24,.2f}" for k in keys))
    print("\nratios vs fp32 (lower is better for all):")
    for row in rows[1:]:
        print(f"{row['variant']:<8}" + "".join(f"{row[k] / base[k]:>24.3f}" for k in keys))
    nf4 = rows[1]
    ok = nf4["disk_bytes"] / base["disk_bytes"] <= 0.5 and (
        "val_perplexity" not in base or nf4["val_perplexity"] / base["val_perplexity"] <= 1.05)
    print(f"\ngoal (nf4 <= 0.5x size, perplexity within +5%): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
