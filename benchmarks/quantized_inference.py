"""Inference on every runtime, one run: per-token latency, tokens/s, size, peak memory and perplexity
of fp32 PyTorch, bitsandbytes nf4, GGUF f16 / Q8_0 / Q4_0 in llama.cpp and ONNX Runtime fp32 / int8,
with ratios against fp32 PyTorch.

The model is `--model DIR` (default: the demo's aligned model, data/lake/aligned_checkpoint/merged,
after `make demo`). Each variant is made first (nf4 quantized and saved, GGUF exported and quantized
by llama.cpp, ONNX exported and int8-quantized), then loaded from disk in its own subprocess, so peak
memory (the rise of resident memory from before the load, sampled every 5 ms, while loading and
generating) holds neither the export nor the others. Each generates `--tokens` tokens greedily from
the same prompts (batch size 1, every runtime producing the same number of tokens, `--threads`
threads each) and is scored for perplexity on the same validation windows when `--tokens-dir` holds
validation.bin (default: the demo's). Size is the weights file(s) on disk.

Goal (issue 17): the best quantized runtime at <= 0.5x fp32 PyTorch's per-token latency and <= 0.35x
its size, with perplexity within +5%.

    .venv/bin/python benchmarks/quantized_inference.py [--model DIR] [--tokens 64] [--prompts 8] \\
        [--windows 32] [--threads 2] [--runtimes pt-fp32 pt-nf4 gguf-f16 ...]
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
RUNTIMES = ("pt-fp32", "pt-nf4", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "ort-fp32", "ort-int8")  # pt-int8 on request
BASELINE = "pt-fp32"


def generate_pt(model, prompts, n_tokens):
    """ms per token for each prompt: transformers' generate, greedy, forced to n_tokens, no penalties."""
    import torch

    latencies = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            start = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                           do_sample=False, repetition_penalty=1.0, pad_token_id=model.config.pad_token_id)
            latencies.append(1000 * (time.perf_counter() - start) / n_tokens)
    return latencies


def measure(runtime: str, path: Path, windows, prompts: list[list[int]], n_tokens: int, threads: int) -> dict:
    """Runs in a fresh process: load, generate, score."""
    import numpy as np
    import torch

    from llm_assets.lib.evaluate import evaluation
    from llm_assets.lib.pretrain.model_dir import load_model, weights_bytes
    from llm_assets.lib.release import gguf_export, onnx_export, quantize

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    with evaluation.PeakMemory() as memory:  # what serving costs: loading the saved model, generating
        if runtime.startswith("pt-"):
            model = (load_model(path) if runtime == "pt-fp32" else quantize.load_quantized(path)).eval()
            disk = weights_bytes(path)
            generate_pt(model, prompts[:1], 4)  # warm-up
            latencies = generate_pt(model, prompts, n_tokens)
            score = (lambda w: evaluation.perplexity(model, torch.from_numpy(w)))
        elif runtime.startswith("gguf-"):
            n_ctx = max(windows.shape[1] - 1, max(map(len, prompts)) + n_tokens + 1)
            llm = gguf_export.load(path, n_ctx=n_ctx, threads=threads)
            disk, latencies = path.stat().st_size, gguf_export.ms_per_token(llm, prompts, n_tokens)
            score = (lambda w: gguf_export.perplexity(llm, w))
        else:
            lm = onnx_export.OnnxLM(path, threads)
            disk, latencies = path.stat().st_size, lm.ms_per_token(prompts, n_tokens)
            score = lm.perplexity
    ms = float(np.percentile(latencies, 50))
    row = {"runtime": runtime, "disk_bytes": disk, "peak_memory_bytes": memory.peak, "ms_per_token_p50": ms,
           "ms_per_token_p95": float(np.percentile(latencies, 95)), "tokens_per_second": 1000 / ms}
    if len(windows):
        row["val_perplexity"] = score(windows)
    return row


def prepare(model_dir: Path, runtimes: list[str], tmp: Path) -> dict[str, Path]:
    """Each runtime's model on disk: made once here, loaded in its own process later."""
    from llm_assets.lib.release import gguf_export, onnx_export, quantize

    paths = {"pt-fp32": model_dir}
    for method in ("nf4", "int8"):
        if f"pt-{method}" in runtimes:
            (tmp / method).mkdir()
            quantize.quantize(model_dir, tmp / method, method)
            paths[f"pt-{method}"] = tmp / method
    types = [r.removeprefix("gguf-") for r in runtimes if r.startswith("gguf-")]
    if types:
        (tmp / "gguf").mkdir()
        paths.update({f"gguf-{t}": p for t, p in gguf_export.export(model_dir, tmp / "gguf", types).items()})
    if any(r.startswith("ort-") for r in runtimes):
        (tmp / "onnx").mkdir()
        paths.update({f"ort-{k}": p for k, p in onnx_export.export(model_dir, tmp / "onnx", int8="ort-int8" in runtimes).items()})
    return paths


def inputs(model_dir: Path, tokens_dir: Path, n_prompts: int, n_windows: int):
    """(validation windows as int64 numpy, possibly empty; prompts as token id lists): the same for every runtime."""
    import numpy as np
    from transformers import AutoTokenizer

    from llm_assets.lib.evaluate import evaluation
    from llm_assets.lib.pretrain.model_dir import context_length
    from llm_assets.lib.tokenizer import packing

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[tok.eos_token_id, *tok(f"def function_{i}(x):")["input_ids"]] for i in range(n_prompts)]
    if not packing.split_path(tokens_dir, "validation").is_file():
        return np.zeros((0, 2), np.int64), prompts
    stream = packing.load_tokens(tokens_dir, "validation")
    return evaluation.validation_windows(stream, context_length(model_dir), n_windows).numpy(), prompts


def report(rows: list[dict], args) -> None:
    base = rows[0]
    keys = ["disk_bytes", "peak_memory_bytes", "ms_per_token_p50", "ms_per_token_p95", "tokens_per_second"]
    keys += ["val_perplexity"] if "val_perplexity" in base else []
    print(f"model: {args.model}  ({args.prompts} prompts x {args.tokens} tokens, batch size 1, greedy, {args.threads} threads)")
    print(f"{'runtime':<10}" + "".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(f"{row['runtime']:<10}" + "".join(f"{row[k]:>20,.2f}" for k in keys))
    print(f"\nratios vs {BASELINE} (lower is better, except tokens/s):")
    for row in rows[1:]:
        print(f"{row['runtime']:<10}" + "".join(f"{row[k] / base[k]:>20.3f}" for k in keys))
    ok_ppl = [r for r in rows[1:] if "val_perplexity" not in base or r["val_perplexity"] <= 1.05 * base["val_perplexity"]]
    small = [r for r in ok_ppl if r["disk_bytes"] <= 0.35 * base["disk_bytes"]]
    if not ok_ppl:
        print("\nno runtime keeps perplexity within +5%")
        return
    best = min(small or ok_ppl, key=lambda r: r["ms_per_token_p50"])  # the fastest at <= 0.35x size, if any is
    latency, size = best["ms_per_token_p50"] / base["ms_per_token_p50"], best["disk_bytes"] / base["disk_bytes"]
    print(f"\nbest runtime ({'fastest at <= 0.35x size' if small else 'none is <= 0.35x size: fastest'} within +5% "
          f"perplexity): {best['runtime']}: {latency:.3f}x latency, {size:.3f}x size"
          + (f", {best['val_perplexity'] / base['val_perplexity']:.3f}x perplexity" if "val_perplexity" in base else "")
          + f" vs {BASELINE}")
    print(f"goal (<= 0.5x latency at <= 0.35x size, perplexity within +5%): {'met' if small and latency <= 0.5 else 'NOT met'}")


def main() -> None:
    from llm_assets.lib.common.paths import ProjectPaths
    from llm_assets.lib.pretrain.model_dir import merged_dir, weights_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=merged_dir(ProjectPaths(ROOT).artifact("aligned_checkpoint")))
    parser.add_argument("--tokens-dir", type=Path, default=ProjectPaths(ROOT).artifact("tokenized_shards"))
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32, help="validation windows scored for perplexity")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), help=f"{BASELINE} first; also pt-int8")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: RUNTIME PATH, print JSON
    args = parser.parse_args()
    windows, prompts = inputs(args.model, args.tokens_dir, args.prompts, args.windows)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure[0], Path(args.measure[1]), windows, prompts, args.tokens, args.threads)))
        return
    if not weights_file(args.model).is_file():
        sys.exit(f"{args.model}: no model.safetensors; run `make demo` first or pass --model DIR")
    runtimes = [BASELINE, *(r for r in args.runtimes if r != BASELINE)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(args.model, runtimes, Path(tmp))
        for runtime in runtimes:
            done = subprocess.run([sys.executable, __file__, "--measure", runtime, str(paths[runtime]),
                                   "--model", str(args.model), "--tokens-dir", str(args.tokens_dir),
                                   "--tokens", str(args.tokens), "--prompts", str(args.prompts),
                                   "--windows", str(args.windows), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:]))
            print(f"measured {runtime}", file=sys.stderr)
    report(rows, args)


if __name__ == "__main__":
    main()
