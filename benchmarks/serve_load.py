"""Load on the model server: 200 requests from 16 concurrent clients against `llm-assets serve` on
loopback; prints p50/p95 latency, throughput and errors, checks every request reached the serving
log, and compares throughput with the same generations done in-process without HTTP (the baseline,
measured in the same run): the ratio is what the HTTP layer, batching-free queueing and logging cost.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--max-new-tokens 32]

Serves the current release (after `make demo`), or the quantized candidate when there is none.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from llm_assets.lib.common.paths import ProjectPaths
    from llm_assets.lib.release.quantize import load_for_inference
    from llm_assets.lib.posttrain.chat_data import end_token_id, prompt_ids
    from llm_assets.lib.release.release import current_release
    from llm_assets.lib.monitor.serving_log import read_log
    from llm_assets.serving.load import ServerProcess, sft_prompts, send, summarize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    paths = ProjectPaths(ROOT)
    release = current_release(paths.releases)
    model_dir = Path(release["path"]) if release else paths.artifact("quantized_model")
    pool = sft_prompts(ROOT, 400)
    prompts = [pool[i % len(pool)] for i in range(args.requests)]
    logged_before = read_log(paths.serving).num_rows

    with ServerProcess(ROOT, None if release else model_dir) as url:
        start = time.perf_counter()  # from the first request to the last answer: start-up excluded
        results = send(url, prompts, args.concurrency, args.max_new_tokens)
        http = summarize(results, time.perf_counter() - start)
    logged = read_log(paths.serving).num_rows - logged_before

    # baseline: the same prompts, generated one after another in this process
    model = load_for_inference(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stop = [end_token_id(tok), tok.eos_token_id]
    start, n_tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([prompt_ids(tok, [{"role": "user", "content": p}])])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
            n_tokens += out.shape[1] - x.shape[1]
    direct_tps = n_tokens / (time.perf_counter() - start)

    print(f"model: {model_dir}")
    print(f"HTTP   {http['requests']} requests, {args.concurrency} clients: {http['errors']} errors, "
          f"latency p50 {http['latency_p50_s']:.3f} s, p95 {http['latency_p95_s']:.3f} s, "
          f"{http['requests_per_second']:.1f} requests/s, {http['tokens_per_second']:.1f} tokens/s")
    print(f"direct {len(prompts)} generations in-process, one at a time: {direct_tps:.1f} tokens/s")
    print(f"ratio HTTP/direct tokens/s: {http['tokens_per_second'] / direct_tps:.3f}")
    print(f"serving log: {logged} of {http['ok']} answered requests logged "
          f"({'all' if logged == http['ok'] else 'MISSING SOME'})")


if __name__ == "__main__":
    main()
