"""Near-duplicate clusters from MinHash signatures, with datasketch's `MinHashLSH` for candidates.

    >>> from llm_assets.lib.data.minhash import signatures
    >>> from llm_assets.lib.data.near_dup import near_duplicate_clusters
    >>> text = " ".join(f"word{i}" for i in range(200))
    >>> texts = [text, "a different short text", text.replace("word100", "changed"),
    ...          text.replace("word10 ", "other "), "", ""]
    >>> near_duplicate_clusters(signatures(texts), threshold=0.8)    # the two empty texts: no cluster
    [Cluster(members=(0, 2, 3), jaccard=(1.0, 0.9453125, 0.9296875))]

Steps: rows with identical signatures are collapsed (exact duplicates would otherwise give a
quadratic number of candidate pairs); the distinct rows go into a `MinHashLSH` tuned for a lower
threshold than the decision threshold, so that pairs whose estimate is just above the threshold are
still proposed; every candidate pair is verified by its estimated Jaccard (fraction of equal
signature positions) >= threshold; union-find joins verified pairs into clusters.

Clusters are transitive: a member is similar to some other member, not necessarily to the
representative; `Cluster.jaccard` shows how close each member is to the representative.

Rows without shingles (all `minhash.EMPTY`) never join a cluster: two empty documents are not
near-duplicates of each other, nor of anything else.

`storage_config` goes to `MinHashLSH` unchanged, e.g. `{"type": "redis", "redis": {"host":
"localhost", "port": 6379}}` keeps this one-off index in Redis. The index that several workers
share while ingesting batches is `ingest.CorpusIndex` (setting `lsh_storage`).

Run on its own: `python -m llm_assets.lib.data.near_dup FILE...` prints the clusters of the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_assets.lib.data.minhash import is_empty

# Why the LSH threshold sits 0.3 below the decision threshold: tuned for 0.8 itself (9 bands of
# 13 rows) the index proposes a pair of true Jaccard 0.8 only 40% of the time; on the stdlib it
# missed 6 of the 28 distinct pairs a brute-force scan finds, and in tests/lib/test_near_dup_quality
# recall fell from 0.957 to 0.867. At 0.5 (25 bands of 5 rows) a pair whose estimate is just 0.8 is
# proposed with probability > 0.999; the extra candidates (464 vs 36 on the stdlib) cost milliseconds.
LSH_MARGIN = 0.3


@dataclass(frozen=True)
class Cluster:
    """A group of near-duplicate documents."""

    members: tuple[int, ...]  # row indices, ascending; members[0] is the representative
    jaccard: tuple[float, ...]  # estimated Jaccard of each member with the representative


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def default_lsh_threshold(threshold: float) -> float:
    """The candidate index's threshold for a decision threshold: LSH_MARGIN below it, at least 0.05."""
    return max(threshold - LSH_MARGIN, 0.05)


def lsh_index(lsh_threshold: float, num_perm: int, storage_config: dict | None = None):
    """datasketch's MinHashLSH (in memory, or where storage_config says, e.g. Redis)."""
    # Imported here: datasketch pulls in scipy (~0.9 s), which every process loading the Dagster
    # definitions would pay for otherwise.
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=lsh_threshold, num_perm=num_perm, storage_config=storage_config)


def sketch(sig: np.ndarray):
    """One signature row as the LeanMinHash datasketch's index takes."""
    from datasketch import LeanMinHash

    # scheme="affine64" only labels the uint64 value range for datasketch's consistency checks;
    # the values are this project's OPH signatures, and LSH only compares them for equality.
    return LeanMinHash(seed=1, hashvalues=sig, scheme="affine64")


def candidate_pairs(
    sigs: np.ndarray, lsh_threshold: float, storage_config: dict | None = None
) -> np.ndarray:
    """Row pairs (i < j) that share at least one LSH band: int (pairs, 2). Rows must be distinct."""
    lsh = lsh_index(lsh_threshold, sigs.shape[1], storage_config)
    sketches = [sketch(row) for row in sigs]
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m, check_duplication=False)
    pairs = [(i, j) for i, m in enumerate(sketches) for j in lsh.query(m) if j > i]
    return np.array(pairs, dtype=np.intp).reshape(-1, 2)


def near_duplicate_clusters(
    sigs: np.ndarray,
    threshold: float = 0.8,
    lsh_threshold: float | None = None,
    storage_config: dict | None = None,
) -> list[Cluster]:
    """Clusters (>= 2 members, sorted by representative) of rows with estimated Jaccard >= threshold.

    sigs: uint64 (docs, num_perm) from `minhash.signatures`. lsh_threshold (default threshold - 0.3,
    at least 0.05) tunes the candidate index: lower finds more borderline pairs and costs more checks.
    """
    if sigs.ndim != 2 or sigs.dtype != np.uint64:
        raise ValueError(f"sigs must be a uint64 (docs, num_perm) array, got {sigs.dtype} {sigs.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if lsh_threshold is None:
        lsh_threshold = default_lsh_threshold(threshold)
    if not 0.0 < lsh_threshold <= 1.0:
        raise ValueError(f"lsh_threshold must be in (0, 1], got {lsh_threshold!r}")

    rows = np.flatnonzero(~is_empty(sigs))
    if len(rows) == 0:
        return []
    # Identical signatures: one LSH entry per distinct row; `inverse` maps rows to it.
    distinct, inverse = np.unique(sigs[rows], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    pairs = candidate_pairs(distinct, lsh_threshold, storage_config) if len(distinct) > 1 else None

    parent = list(range(len(distinct)))
    if pairs is not None and len(pairs):
        est = (distinct[pairs[:, 0]] == distinct[pairs[:, 1]]).mean(axis=1)  # (pairs,)
        keep = pairs[est >= threshold]
        for a, b in keep.tolist():
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    groups: dict[int, list[int]] = {}
    for row, d in zip(rows.tolist(), inverse.tolist()):
        groups.setdefault(_find(parent, d), []).append(row)
    clusters = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()
        est = (sigs[members] == sigs[members[0]]).mean(axis=1)  # (members,)
        clusters.append(Cluster(tuple(members), tuple(float(x) for x in est)))
    clusters.sort(key=lambda c: c.members[0])
    return clusters


def _main(paths: list[str]) -> None:
    from llm_assets.lib.data.minhash import signatures

    texts = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
    for cluster in near_duplicate_clusters(signatures(texts)):
        for i, jac in zip(cluster.members, cluster.jaccard):
            print(f"{jac:.3f}  {paths[i]}")
        print()


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
