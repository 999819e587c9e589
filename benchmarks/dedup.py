"""Near-duplicate detection speed: llm_assets.lib.minhash.signatures vs datasketch MinHash.

Corpus: the running Python's standard library .py files (site-packages skipped), read as UTF-8 with
errors="replace". Both paths use the same shingles (word 5-grams, `minhash.shingles`) and num_perm.

- baseline: one datasketch `MinHash(num_perm)` per document, `update_batch(list(shingles(text)))`
  (Python shingling + SHA-1 per shingle + num_perm affine permutations).
- fast: `signatures(texts, num_perm)` (vectorized shingling + one-permutation hashing).

Both signature sets go through the same `near_duplicate_clusters`; a document's decision is "is a
member of some cluster". Printed: MB/s of each signature path (clustering timed separately), the
speed ratio fast/baseline, and the share of documents whose decision agrees.

    .venv/bin/python benchmarks/dedup.py [--limit N] [--num-perm 128] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import numpy as np
from datasketch import MinHash

from llm_assets.lib.data.minhash import EMPTY, shingles, signatures
from llm_assets.lib.data.near_dup import near_duplicate_clusters


def stdlib_texts(limit: int | None) -> tuple[list[str], list[str]]:
    """(relative paths, texts) of the stdlib .py files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    paths = paths[:limit] if limit else paths
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    return [str(p.relative_to(root)) for p in paths], texts


def baseline_signatures(texts: list[str], num_perm: int) -> np.ndarray:
    """datasketch MinHash per document: uint64 (docs, num_perm); documents without shingles -> EMPTY."""
    rows = []
    for text in texts:
        sh = list(shingles(text))
        if not sh:  # datasketch's empty sketch is all 2**32-1; use the project's EMPTY marker
            rows.append(np.full(num_perm, EMPTY, dtype=np.uint64))
            continue
        m = MinHash(num_perm=num_perm)
        m.update_batch(sh)
        rows.append(m.hashvalues.astype(np.uint64))
    return np.stack(rows)


def timed(fn, repeats: int):
    """(best wall seconds over `repeats` calls, last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def flagged(sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, int, float]:
    """(bool (docs,) member of some cluster, number of clusters, clustering seconds)."""
    t0 = time.perf_counter()
    clusters = near_duplicate_clusters(sigs, threshold=threshold)
    seconds = time.perf_counter() - t0
    is_dup = np.zeros(len(sigs), dtype=bool)
    for c in clusters:
        is_dup[list(c.members)] = True
    return is_dup, len(clusters), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N files (sorted)")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.8, help="Jaccard decision threshold")
    ap.add_argument("--repeats", type=int, default=3, help="fast path: best of this many runs")
    args = ap.parse_args()

    names, texts = stdlib_texts(args.limit)
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    n_empty = sum(1 for t in texts if not shingles(t))
    print(f"corpus: {len(texts)} stdlib .py files, {mb:.1f} MB, {n_empty} without shingles")

    t_base, base = timed(lambda: baseline_signatures(texts, args.num_perm), 1)
    t_fast, fast = timed(lambda: signatures(texts, num_perm=args.num_perm), args.repeats)
    print(f"baseline datasketch MinHash: {t_base:7.2f} s  {mb / t_base:7.1f} MB/s")
    print(f"fast signatures (best of {args.repeats}): {t_fast:7.2f} s  {mb / t_fast:7.1f} MB/s")

    dup_base, nc_base, c_base = flagged(base, args.threshold)
    dup_fast, nc_fast, c_fast = flagged(fast, args.threshold)
    agree = float(np.mean(dup_base == dup_fast))
    print(f"baseline: {dup_base.sum()} docs in {nc_base} clusters (clustering {c_base:.2f} s)")
    print(f"fast:     {dup_fast.sum()} docs in {nc_fast} clusters (clustering {c_fast:.2f} s)")
    # Most documents are flagged by neither: the flagged ones show how well the decisions agree.
    print(f"flagged by both {np.sum(dup_base & dup_fast)}, baseline only {np.sum(dup_base & ~dup_fast)}, "
          f"fast only {np.sum(~dup_base & dup_fast)}")
    for i in np.flatnonzero(dup_base != dup_fast):
        print(f"  disagree: {names[i]} baseline={bool(dup_base[i])} fast={bool(dup_fast[i])}")
    print(f"ratio {t_base / t_fast:.1f}x  agreement {100 * agree:.1f}%  ({len(texts)} docs)")


if __name__ == "__main__":
    main()
