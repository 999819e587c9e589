"""Load on the model server: the same requests sent to one `llm-assets serve` on loopback, first one at
a time, then from 16 concurrent clients. Prints both throughputs and their ratio (what batched
generation buys: the target is >= 3x), p50/p95 latency of each run, the batch sizes the server
reached (its llm_batch_size histogram), and checks every request reached the serving log.

    .venv/bin/python benchmarks/serve_load.py [--requests 96] [--concurrency 16] [--max-new-tokens 32] [--rounds 3]
                                              [--model DIR]

Serves the current release (after `make demo`), or the quantized candidate when there is none, or
--model. Requests are greedy, so both runs generate the same tokens. The two runs take turns
(--rounds times each), so a machine shared with other work slows both alike.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BUCKET = re.compile(r'^llm_batch_size_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def batch_histogram(url: str) -> dict[str, float]:
    """Decoding steps whose batch had at most `le` requests, by `le` (cumulative, as Prometheus keeps it)."""
    return {le: float(n) for le, n in BUCKET.findall(httpx.get(f"{url}/metrics").text)}


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> str:
    """The steps of one run by batch-size bucket, e.g. '1: 10, 2-4: 3, 9-16: 120'."""
    edges = sorted((float(le), le) for le in after)
    rows, below, low = [], 0.0, 1
    for value, le in edges:
        cumulative = after[le] - before.get(le, 0.0)
        if cumulative - below > 0:
            top = "+" if value == float("inf") else int(value)
            rows.append(f"{low if low == top else f'{low}-{top}'}: {int(cumulative - below)}")
        below, low = cumulative, int(value) + 1 if value != float("inf") else low
    return ", ".join(rows) or "none"


def add(histogram: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    for le, n in after.items():
        histogram[le] = histogram.get(le, 0.0) + n - before.get(le, 0.0)


def runs(url: str, prompts: list[str], concurrency: int, max_new_tokens: int, rounds: int) -> list[tuple[dict, str]]:
    """(summary, steps by batch size) of the prompts sent one at a time and from `concurrency`
    clients, taking turns `rounds` times: load from other processes falls on both alike."""
    from llm_assets.serving.load import send, summarize

    found = {1: ([], 0.0, {}), concurrency: ([], 0.0, {})}
    for _ in range(rounds):
        for clients in (1, concurrency):
            results, seconds, histogram = found[clients]
            before, start = batch_histogram(url), time.perf_counter()
            results += send(url, prompts, clients, max_new_tokens)
            found[clients] = (results, seconds + time.perf_counter() - start, histogram)
            add(histogram, before, batch_histogram(url))
    return [(summarize(r, t), batch_sizes({}, h)) for r, t, h in found.values()]


def main() -> None:
    from llm_assets.lib.common.paths import ProjectPaths
    from llm_assets.lib.monitor.serving_log import read_log
    from llm_assets.lib.release.release import current_release
    from llm_assets.serving.load import ServerProcess, sft_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="turns each way (one at a time, then concurrent)")
    parser.add_argument("--model", type=Path, help="serve this model directory (default: the release, else "
                                                   "data/lake/quantized_model)")
    args = parser.parse_args()
    paths = ProjectPaths(ROOT)
    release = current_release(paths.releases)
    model_dir = args.model or (None if release else paths.artifact("quantized_model"))
    pool = sft_prompts(ROOT, 400)
    prompts = [pool[i % len(pool)] for i in range(args.requests)]
    logged_before = read_log(paths.serving).num_rows

    with ServerProcess(ROOT, model_dir, ["--max-batch-size", str(args.concurrency)]) as url:
        runs(url, prompts[:2], 1, args.max_new_tokens, 1)  # warm-up, not counted
        (alone, alone_batches), (together, together_batches) = runs(url, prompts, args.concurrency,
                                                                     args.max_new_tokens, args.rounds)
    logged = read_log(paths.serving).num_rows - logged_before
    answered = alone["ok"] + together["ok"] + 4

    print(f"model: {model_dir or release['path']}")
    for name, stats, batches in (("one at a time", alone, alone_batches),
                                 (f"{args.concurrency} clients", together, together_batches)):
        print(f"{name:>14}: {stats['requests']} requests, {stats['errors']} errors, "
              f"{stats['requests_per_second']:.2f} requests/s, {stats['tokens_per_second']:.1f} tokens/s, "
              f"latency p50 {stats['latency_p50_s']:.3f} s, p95 {stats['latency_p95_s']:.3f} s; "
              f"decoding steps by batch size: {batches}")
    ratio = together["tokens_per_second"] / alone["tokens_per_second"]
    print(f"ratio {args.concurrency} clients / one at a time (tokens/s): {ratio:.2f}x (target >= 3x)")
    print(f"serving log: {logged} of {answered} answered requests logged "
          f"({'all' if logged == answered else 'MISSING SOME'})")


if __name__ == "__main__":
    main()
