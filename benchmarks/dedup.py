"""Near-duplicate detection speed: llm_assets.lib.minhash.signatures vs datasketch MinHash, on one core and all.

Corpus: the running Python's standard library .py files (site-packages skipped), read as UTF-8 with
errors="replace". Both paths use the same shingles (word 5-grams, `minhash.shingles`) and num_perm.

- baseline: one datasketch `MinHash(num_perm)` per document, `update_batch(list(shingles(text)))`
  (Python shingling + SHA-1 per shingle + num_perm affine permutations).
- fast: `signatures(texts, num_perm)` (vectorized shingling + one-permutation hashing), on one core
  (workers=1) and on every core (a process pool over parts of the corpus; its first call starts
  the pool, so the cold figure is printed too).

Both signature sets go through the same `near_duplicate_clusters`; a document's decision is "is a
member of some cluster". Printed: MB/s of each signature path (clustering timed separately), the
speed ratios all-core/1-core and fast/baseline, and the share of documents whose decision agrees
(all-core vs 1-core must be 100%: the signatures are identical).

--ingest: an incoming batch's ingest time against the corpus size, before (the corpus's texts read
and hashed again per batch, on one core, as incoming_batch did) and after (the signatures persisted
beside the shards read back; only the batch is hashed).

    .venv/bin/python benchmarks/dedup.py [--limit N] [--num-perm 128] [--threshold 0.8] [--ingest]
"""

from __future__ import annotations

import argparse
import functools
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from datasketch import MinHash

from llm_assets.lib.data.clean import CleanRules
from llm_assets.lib.data.corpus import Document
from llm_assets.lib.data.dedup import DedupParams, deduplicate, read_split, write_shards
from llm_assets.lib.data.ingest import CorpusIndex, ingest, known_signatures
from llm_assets.lib.data.minhash import EMPTY, cores, shingles, signatures
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


def _busy(_: int) -> float:
    """A fixed piece of numpy work (no I/O, no sharing): seconds it took."""
    a, t0 = np.arange(1 << 18, dtype=np.uint64), time.perf_counter()
    for _ in range(300):
        a *= np.uint64(3)
        np.cumsum(a, out=a)
    return time.perf_counter() - t0


def parallel_capacity() -> float:
    """How much faster `cores()` identical, independent numpy tasks finish on as many processes than
    one after another: the ceiling of all-core / 1-core here and now (on a shared machine, other
    people's work lowers it)."""
    n = cores()
    alone = min(_busy(0) for _ in range(2))
    with ProcessPoolExecutor(n) as pool:
        list(pool.map(_busy, range(n)))  # workers started
        t0 = time.perf_counter()
        list(pool.map(_busy, range(n)))
        together = time.perf_counter() - t0
    return n * alone / together


def signature_speeds(texts: list[str], mb: float, num_perm: int, repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """(seconds, signatures) of the datasketch baseline, 1-core, all-core cold and all-core warm."""
    out = {"baseline": timed(lambda: baseline_signatures(texts, num_perm), 1)}
    out["1-core"] = timed(lambda: signatures(texts, num_perm=num_perm, workers=1), repeats)
    out["all-core cold"] = timed(lambda: signatures(texts, num_perm=num_perm), 1)  # starts the pool
    out["all-core"] = timed(lambda: signatures(texts, num_perm=num_perm), repeats)
    for name, (seconds, _) in out.items():
        print(f"{name + ':':15s} {seconds:7.2f} s  {mb / seconds:7.1f} MB/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N files (sorted)")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.8, help="Jaccard decision threshold")
    ap.add_argument("--repeats", type=int, default=3, help="fast paths: best of this many runs")
    ap.add_argument("--ingest", action="store_true", help="also time a batch's ingest against the corpus size")
    args = ap.parse_args()

    names, texts = stdlib_texts(args.limit)
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    n_empty = sum(1 for t in texts if not shingles(t))
    print(f"corpus: {len(texts)} stdlib .py files, {mb:.1f} MB, {n_empty} without shingles; {cores()} cores")
    speeds = signature_speeds(texts, mb, args.num_perm, args.repeats)
    (t_base, base), (t_one, one), (t_all, fast) = speeds["baseline"], speeds["1-core"], speeds["all-core"]
    print(f"all-core / 1-core {t_one / t_all:.2f}x (ceiling here and now: {parallel_capacity():.2f}x, "
          f"independent numpy tasks); identical signatures: {bool(np.array_equal(one, fast))}")

    dup_base, nc_base, c_base = flagged(base, args.threshold)
    dup_one, _, _ = flagged(one, args.threshold)
    dup_fast, nc_fast, c_fast = flagged(fast, args.threshold)
    print(f"baseline: {dup_base.sum()} docs in {nc_base} clusters (clustering {c_base:.2f} s)")
    print(f"fast:     {dup_fast.sum()} docs in {nc_fast} clusters (clustering {c_fast:.2f} s)")
    print(f"decisions all-core vs 1-core: {100 * float(np.mean(dup_one == dup_fast)):.1f}% agree")
    # Most documents are flagged by neither: the flagged ones show how well the decisions agree.
    print(f"flagged by both {np.sum(dup_base & dup_fast)}, baseline only {np.sum(dup_base & ~dup_fast)}, "
          f"fast only {np.sum(~dup_base & dup_fast)}")
    for i in np.flatnonzero(dup_base != dup_fast):
        print(f"  disagree: {names[i]} baseline={bool(dup_base[i])} fast={bool(dup_fast[i])}")
    agree = float(np.mean(dup_base == dup_fast))
    print(f"ratio over datasketch: 1-core {t_base / t_one:.1f}x, all-core {t_base / t_all:.1f}x  "
          f"agreement {100 * agree:.1f}%  ({len(texts)} docs)")
    if args.ingest:
        ingest_times(names, texts)


def ingest_times(names: list[str], texts: list[str], batch_size: int = 50) -> None:
    """A batch of `batch_size` documents (half of them new) ingested against growing corpora."""
    params = DedupParams(validation_fraction=0.1)
    docs = [Document(n, "stdlib", n, t, len(t.encode())) for n, t in zip(names, texts)]
    half = batch_size // 2
    new = [f"batch text {i}: " + " ".join(f"w{i}x{j % 53}y{(i * j) % 17}" for j in range(400)) for i in range(half)]
    batch = [Document(f"b{i}", "batch", f"b{i}", t, len(t)) for i, t in enumerate(new + texts[: batch_size - half])]
    print(f"\nbatch of {len(batch)} documents, ingest seconds (best of 3) against the corpus:")
    print(f"{'corpus MB':>10} {'documents':>10} {'before (rehash)':>16} {'after (persisted)':>18}")
    for share in (0.125, 0.25, 0.5, 1.0):
        part = docs[: max(batch_size, int(len(docs) * share))]
        with tempfile.TemporaryDirectory() as tmp:
            shards, lake = Path(tmp) / "shards", Path(tmp) / "lake"
            shards.mkdir()
            write_shards(deduplicate(part, params), shards, 8.0, params)
            before, _ = timed(lambda: ingest_rehashing(shards, batch, params), 3)
            load = functools.partial(known_signatures, shards, lake, params)
            after, _ = timed(lambda: ingest(batch, CorpusIndex(params), CleanRules(), params, "b", load), 3)
        mb = sum(d.n_bytes for d in part) / 1e6
        print(f"{mb:10.1f} {len(part):10d} {before:16.3f} {after:18.3f}")


def ingest_rehashing(shards: Path, batch: list[Document], params: DedupParams):
    """What incoming_batch did before signatures were persisted: read every text, hash it (one core)."""
    index = CorpusIndex(params)
    for split in ("train", "validation"):
        table = read_split(shards, split)
        texts = table.column("text").to_pylist()
        sigs = signatures(texts, num_perm=params.num_perm, k=params.shingle_size, seed=params.seed, workers=1)
        index.add(table.column("doc_id").to_pylist(), texts, sigs)
    return ingest(batch, index, CleanRules(), params)


if __name__ == "__main__":
    main()
