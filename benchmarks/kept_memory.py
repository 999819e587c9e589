"""Page faults and time of a training step with glibc's default allocator vs inside
`kept_freed_memory()` (llm_assets/lib/common/memory.py), in one run.

The step is lm-head sized: (2048 tokens x 256) -> 8192 logits, 64 MB of fp32 logits and as much
gradient. Each mode runs in a fresh process (so each starts from glibc's defaults), warms up for
`--warmup` steps while the heap grows, then times `--steps` steps. Printed per mode: the median
minor page faults and milliseconds per step; then the ratios default/kept.

    .venv/bin/python benchmarks/kept_memory.py [--steps 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import contextlib, json, resource, sys, time, torch
from llm_assets.lib.common.memory import kept_freed_memory
mode, warmup, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
head, x = torch.nn.Linear(256, 8192), torch.randn(2048, 256)
target = torch.randint(0, 8192, (2048,))
faults, seconds = [], []
with kept_freed_memory() if mode == "keep" else contextlib.nullcontext() as kept:
    for i in range(warmup + steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        torch.nn.functional.cross_entropy(head(x), target).backward()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"kept": kept, "faults": faults, "seconds": seconds}))
"""


def run(mode: str, warmup: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(warmup), str(steps)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    medians = {}
    for mode in ("default", "keep"):
        result = run(mode, args.warmup, args.steps)
        medians[mode] = (statistics.median(result["faults"]), statistics.median(result["seconds"]) * 1000)
        print(f"{mode:8s} kept={result['kept']!s:5s} faults/step {medians[mode][0]:>9,.0f}  ms/step {medians[mode][1]:7.1f}")
    (f_default, ms_default), (f_kept, ms_kept) = medians["default"], medians["keep"]
    print(f"faults default/kept: {f_default / max(f_kept, 1):.1f}x   time default/kept: {ms_default / ms_kept:.2f}x")


if __name__ == "__main__":
    main()
