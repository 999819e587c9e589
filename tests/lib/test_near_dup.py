"""near_duplicate_clusters mechanics on signatures built to a known estimated Jaccard (the share of
equal positions), so every decision at the threshold is exact. Quality on real text:
test_near_dup_quality.py."""

from __future__ import annotations

import numpy as np
import pytest

from llm_assets.lib.data.minhash import EMPTY, signatures
from llm_assets.lib.data.near_dup import Cluster, candidate_pairs, near_duplicate_clusters

P = 128  # signature positions


def rows(n: int, seed: int = 0) -> np.ndarray:
    """n unrelated random signatures (no position in common, in practice)."""
    return np.random.default_rng(seed).integers(0, 2**63, size=(n, P), dtype=np.uint64)


def edited(sig: np.ndarray, changed: int, seed: int) -> np.ndarray:
    """A copy of `sig` with `changed` positions replaced: estimated Jaccard (P - changed) / P."""
    out = sig.copy()
    idx = np.random.default_rng(seed).choice(P, size=changed, replace=False)
    out[idx] = np.random.default_rng(seed + 1000).integers(0, 2**63, size=changed, dtype=np.uint64)
    return out


def test_unrelated_rows_form_no_cluster():
    assert near_duplicate_clusters(rows(50)) == []


def test_the_threshold_is_inclusive_and_exact():
    base = rows(1)[0]
    at, below = edited(base, 25, seed=1), edited(base, 26, seed=2)  # 103/128 and 102/128
    threshold = 103 / P
    sigs = np.stack([base, at, below, *rows(5, seed=9)])
    (cluster,) = near_duplicate_clusters(sigs, threshold=threshold)
    assert cluster == Cluster(members=(0, 1), jaccard=(1.0, threshold))


def test_clusters_are_transitive_and_keep_the_smallest_row_as_representative():
    a = rows(1, seed=3)[0]
    b = edited(a, 20, seed=4)  # ~0.84 to a
    c = edited(b, 20, seed=5)  # ~0.84 to b, less to a
    sigs = np.stack([*rows(2, seed=6), c, b, a])  # rows 2, 3, 4
    (cluster,) = near_duplicate_clusters(sigs, threshold=0.8)
    assert cluster.members == (2, 3, 4)
    assert cluster.jaccard[0] == 1.0
    assert cluster.jaccard[1] == pytest.approx(float((sigs[3] == sigs[2]).mean()))
    assert float((sigs[4] == sigs[2]).mean()) < 0.8  # a joined through b, not by its own likeness to c


def test_identical_rows_cluster_and_empty_rows_never_do():
    base = rows(1, seed=7)[0]
    empty = np.full(P, EMPTY, dtype=np.uint64)
    sigs = np.stack([empty, base, empty, base, base, empty])
    assert near_duplicate_clusters(sigs) == [Cluster((1, 3, 4), (1.0, 1.0, 1.0))]
    assert near_duplicate_clusters(np.stack([empty, empty])) == []


def test_lsh_proposes_pairs_just_above_the_threshold():
    """The candidate index is tuned 0.3 below the decision threshold: pairs at 0.81 are never missed."""
    bases = rows(40, seed=11)
    copies = np.stack([edited(b, 24, seed=100 + i) for i, b in enumerate(bases)])  # 104/128 = 0.8125
    clusters = near_duplicate_clusters(np.concatenate([bases, copies]), threshold=0.8)
    assert sorted(c.members for c in clusters) == [(i, 40 + i) for i in range(40)]


def test_candidate_pairs_are_ordered_index_pairs():
    base = rows(1, seed=12)[0]
    sigs = np.stack([base, *rows(3, seed=13), edited(base, 5, seed=14)])
    pairs = candidate_pairs(sigs, lsh_threshold=0.5)
    assert pairs.shape[1] == 2 and pairs.dtype == np.intp
    assert [0, 4] in pairs.tolist() and all(i < j for i, j in pairs.tolist())


def test_real_signatures_of_an_edited_copy():
    text = " ".join(f"word{i}" for i in range(300))
    sigs = signatures([text, text.replace("word150", "changed"), "something else entirely here"])
    (cluster,) = near_duplicate_clusters(sigs)
    assert cluster.members == (0, 1) and cluster.jaccard[1] > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"sigs": np.zeros((2, P), dtype=np.int64)}, "uint64"),
    ({"sigs": np.zeros(P, dtype=np.uint64)}, "uint64"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"lsh_threshold": 1.5}, "lsh_threshold"),
])
def test_bad_arguments_fail_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        near_duplicate_clusters(**{"sigs": rows(2), **kwargs})
