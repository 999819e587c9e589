"""Quality of near_duplicate_clusters against exact Jaccard, on stdlib files and edited copies.

Labeled set: 450 distinct stdlib .py files (deterministic choice; encodings/ is left out: its
generated codec tables are near-duplicates of each other) and two copies of each: one edited at a
rate that lands mostly above Jaccard 0.8 (0.5%, 1% or 2%, the last near it) and one below (5%,
10% or 20%), cycling through the rates. An edit touches a word with probability `rate` and
replaces, deletes or inserts a word after it (seeded). Truth is the exact Jaccard of the reference
shingle sets, computed for every pair within a family (original and its copies) and for every pair
the method predicts (same cluster).

Why not every rate for every original: clusters are transitive (union-find), so with six copies the
0.5% and 2% copies of one file share a cluster through the original while their own Jaccard is
~0.77; pair precision then drops to ~0.73 for reasons that have nothing to do with the signatures.
"""

from __future__ import annotations

import re
import sysconfig
from itertools import combinations
from pathlib import Path

import numpy as np

from llm_assets.lib.data.minhash import shingles, signatures
from llm_assets.lib.data.near_dup import Cluster, near_duplicate_clusters

THRESHOLD = 0.8
ABOVE = (0.005, 0.01, 0.02)  # edit rates giving exact Jaccard mostly >= 0.8
BELOW = (0.05, 0.10, 0.20)  # and < 0.8
# The str twin of minhash's word bytes [a-z0-9_\x80-\xff] (A-Z lower to a-z; non-ASCII -> >= 0x80).
WORD = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff]+")


def originals(n: int = 450) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    paths = [p for p in paths if "encodings" not in p.parts and 2_000 <= p.stat().st_size <= 40_000]
    texts, seen = [], set()
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        key = frozenset(shingles(text))
        if key not in seen:  # distinct shingle sets only
            seen.add(key)
            texts.append(text)
        if len(texts) == n:
            break
    assert len(texts) >= n, len(texts)
    return texts[:n]


def edit(text: str, rate: float, rng: np.random.Generator) -> str:
    """Copy of text with each word replaced, deleted or followed by a new word with prob. rate."""
    out, last = [], 0
    for m in WORD.finditer(text):
        if rng.random() >= rate:
            continue
        out.append(text[last : m.start()])
        new = "zq" + "".join(rng.choice(list("abcdefghijklmnop"), size=6))
        op = rng.integers(3)
        out.append(new if op == 0 else "" if op == 1 else m.group() + " " + new)
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def test_edit_keeps_untouched_words():
    rng = np.random.default_rng(0)
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    assert edit(text, 0.0, rng) == text
    assert len(WORD.findall(edit(text, 1.0, rng))) >= 1


def test_near_duplicate_precision_and_recall():
    rng = np.random.default_rng(1234)
    docs, rates = [], []  # docs[3 f] is original f, then its two copies
    for f, text in enumerate(originals()):
        pair_rates = (ABOVE[f % 3], BELOW[f % 3])
        docs += [text] + [edit(text, rate, rng) for rate in pair_rates]
        rates += [0.0, *pair_rates]
    sets = [shingles(d) for d in docs]

    clusters = near_duplicate_clusters(signatures(docs, num_perm=128), threshold=THRESHOLD)
    predicted = {pair for c in clusters for pair in combinations(c.members, 2)}
    in_family = {pair for start in range(0, len(docs), 3) for pair in combinations(range(start, start + 3), 2)}

    def jac(i: int, j: int) -> float:
        return len(sets[i] & sets[j]) / len(sets[i] | sets[j])

    exact = {pair: jac(*pair) for pair in in_family | predicted}
    truth = {pair for pair, j in exact.items() if j >= THRESHOLD}
    hits = len(predicted & truth)
    precision = hits / max(len(predicted), 1)
    recall = hits / max(len(truth), 1)
    print(
        f"\nnear-dup quality: {len(docs)} docs, {len(exact)} pairs scored, {len(truth)} true "
        f"(exact J >= {THRESHOLD}), {len(predicted)} predicted, {hits} correct: "
        f"precision {precision:.3f} recall {recall:.3f}"
    )
    for rate in ABOVE + BELOW:  # (original, copy) pairs per edit rate
        pairs = [(i - i % 3, i) for i in range(len(docs)) if rates[i] == rate]
        js = np.array([exact[p] for p in pairs])
        flagged = np.array([p in predicted for p in pairs])
        print(
            f"  edit rate {rate:5.1%}: {len(pairs)} pairs, exact J median {np.median(js):.3f}, "
            f"J >= {THRESHOLD} {np.mean(js >= THRESHOLD):.1%}, flagged {flagged.mean():.1%}"
        )
    assert len(truth) >= 300 and len(exact) - len(truth) >= 600  # both sides are well populated
    assert precision >= 0.95
    assert recall >= 0.90


def test_empty_rows_never_cluster_and_duplicates_do():
    a = "the same five words here and then some more words to fill"
    sig = signatures(["", a, "", "!!!", a, a + " extra"])
    clusters = near_duplicate_clusters(sig)
    assert clusters == [Cluster(members=(1, 4, 5), jaccard=clusters[0].jaccard)]
    assert clusters[0].jaccard[:2] == (1.0, 1.0) and 0.8 <= clusters[0].jaccard[2] < 1.0
    assert near_duplicate_clusters(signatures(["", "", "?"])) == []
