"""Unit tests for llm_assets.lib.data.minhash: shingles, fast signatures vs the plain-Python twin."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm_assets.lib.data.minhash import (
    EMPTY,
    _parts,
    _pool,
    _signatures,
    cores,
    estimate_jaccard,
    is_empty,
    reference_signature,
    shingles,
    signatures,
)
from llm_assets.lib.data.near_dup import near_duplicate_clusters

EDGE_TEXTS = [
    "",
    "   !!! --- ...\n\t",  # no words
    "one",
    "Two Words",
    "exactly five words are here",
    "ÄBC déf ÇA va? naïve café, ünïcödé 🙂emoji🙂 snake_case CamelCase 42",
    "x" * 5000,  # one long word
    "A b\0c d e f g",  # NUL inside a text is a separator byte too
]


def stdlib_files(n: int, max_bytes: int = 20_000) -> list[str]:
    """n deterministic stdlib .py texts of at most max_bytes each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    paths = [p for p in paths if 500 < p.stat().st_size <= max_bytes]
    step = max(1, len(paths) // n)
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths[::step][:n]]


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def test_shingles_reference_definition():
    assert shingles("Hello, World! foo_bar 42", k=2) == {b"hello world", b"world foo_bar", b"foo_bar 42"}
    assert shingles("a b c", k=5) == {b"a b c"}  # 1..k-1 words: one shingle of all words
    assert shingles("", k=5) == set() and shingles("?!", k=5) == set()
    # Only ASCII is lowered; non-ASCII characters stay inside words.
    assert shingles("ÄBC déf-GHI", k=3) == {"Äbc déf ghi".encode()}


def test_fast_path_equals_reference_bit_for_bit():
    texts = EDGE_TEXTS + stdlib_files(12)
    sig = signatures(texts, num_perm=64, k=5, seed=7)
    assert sig.shape == (len(texts), 64) and sig.dtype == np.uint64
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(sig[i], reference_signature(text, num_perm=64, k=5, seed=7))


@pytest.mark.parametrize("k", [1, 3])
def test_other_k_equals_reference(k):
    texts = EDGE_TEXTS + stdlib_files(3)
    sig = signatures(texts, num_perm=32, k=k)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(sig[i], reference_signature(text, num_perm=32, k=k))


def test_signature_does_not_depend_on_batch_or_chunking():
    texts = stdlib_files(20) + EDGE_TEXTS
    together = signatures(texts)
    tiny_chunks = signatures(texts, chunk_bytes=64)  # every text alone in its chunk
    reversed_batch = signatures(texts[::-1])[::-1]
    alone = np.stack([signatures([t])[0] for t in texts])
    for other in (tiny_chunks, reversed_batch, alone):
        np.testing.assert_array_equal(together, other)


def test_identical_disjoint_and_empty():
    a, b = stdlib_files(2)
    sig = signatures([a, a, b, "", "--- !!!", "completely different words in this one line"])
    assert estimate_jaccard(sig[0], sig[1]) == 1.0
    assert exact_jaccard(shingles(a), shingles(b)) < 0.05 and estimate_jaccard(sig[0], sig[2]) < 0.1
    assert is_empty(sig[3]) and is_empty(sig[4]) and (sig[3] == EMPTY).all()
    assert estimate_jaccard(sig[3], sig[4]) == 0.0  # two empty documents are not similar
    assert estimate_jaccard(sig[3], sig[0]) == 0.0
    assert estimate_jaccard(sig[5], sig[0]) == 0.0
    assert not is_empty(sig[5]).any()  # one shingle fills every bucket after densification
    assert signatures([]).shape == (0, 128)


def test_estimate_tracks_exact_jaccard_on_stdlib_files():
    # Pairs (file, its first x% of lines): exact Jaccard spreads over (0, 1).
    errors = []
    for text, frac in zip(stdlib_files(40, max_bytes=60_000), np.linspace(0.1, 0.95, 40)):
        lines = text.splitlines(keepends=True)
        part = "".join(lines[: int(len(lines) * frac)])
        exact = exact_jaccard(shingles(text), shingles(part))
        sig = signatures([text, part])
        errors.append(estimate_jaccard(sig[0], sig[1]) - exact)
        assert abs(errors[-1]) <= 4.5 * np.sqrt(exact * (1 - exact) / 128) + 0.02
    assert abs(np.mean(errors)) < 0.02  # unbiased
    assert np.mean(np.abs(errors)) < 0.05  # ~sqrt(J(1-J)/128) ~ 0.03 on average


def test_densified_short_documents_are_unbiased():
    # Documents of 4..20 shingles leave most of the 128 buckets empty: densification must still
    # give P[equal position] = Jaccard, so the mean estimate over many pairs matches the mean exact.
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(10_000)]
    exact, est = [], []
    for _ in range(300):
        n = int(rng.integers(8, 25))
        words = list(rng.choice(vocab, size=n + 8, replace=False))
        cut = int(rng.integers(1, 8))
        a, b = " ".join(words[:n]), " ".join(words[cut : n + cut])
        sig = signatures([a, b], seed=int(rng.integers(0, 2**31)))
        exact.append(exact_jaccard(shingles(a), shingles(b)))
        est.append(estimate_jaccard(sig[0], sig[1]))
    assert abs(np.mean(est) - np.mean(exact)) < 0.02
    assert np.mean(np.abs(np.subtract(est, exact))) < 0.06


def test_deterministic_per_seed():
    texts = stdlib_files(3)
    np.testing.assert_array_equal(signatures(texts, seed=3), signatures(texts, seed=3))
    assert (signatures(texts, seed=3) != signatures(texts, seed=4)).mean() > 0.99


@pytest.mark.parametrize(
    "kwargs",
    [{"num_perm": 100}, {"num_perm": 1}, {"num_perm": 0}, {"num_perm": 2**17}, {"k": 0}, {"seed": -1},
     {"chunk_bytes": 0}, {"workers": 0}, {"part_chars": 0}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        signatures(["some text"], **kwargs)


def test_non_str_text_raises():
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        signatures(["fine", b"bytes"])
    with pytest.raises(ValueError, match="shapes"):
        estimate_jaccard(np.zeros(4, np.uint64), np.zeros(8, np.uint64))


def test_all_cores_give_the_one_core_signatures_and_decisions():
    files = stdlib_files(40, max_bytes=40_000)
    near = [t.replace("def ", "def  x", 1) for t in files[:10]]  # one word changed: near duplicates
    texts = files + near + EDGE_TEXTS
    bounds = _parts(texts, part_chars=30_000, max_parts=16)
    assert len(bounds) > 3 and bounds[0] == 0 and bounds[-1] == len(texts)  # so the pool is used below
    one = signatures(texts, workers=1)
    pooled = signatures(texts, workers=2, part_chars=30_000)
    np.testing.assert_array_equal(one, pooled)  # bit for bit, so every decision agrees
    # whichever parts the pool's process hashed (this process takes those it has not finished):
    # a worker process gives the same signatures
    in_worker = _pool(1).submit(_signatures, texts, 128, 5, 1, 1 << 18).result(timeout=120)
    np.testing.assert_array_equal(in_worker, one)
    clusters = near_duplicate_clusters(one)
    assert len(clusters) >= 8 and near_duplicate_clusters(pooled) == clusters
    np.testing.assert_array_equal(signatures(texts), one)  # default: every core
    assert cores() >= 1


def test_parts_are_contiguous_and_balanced():
    texts = ["x" * n for n in [10, 500, 20, 20, 300, 150, 1, 0]]
    assert _parts(texts, part_chars=2000, max_parts=8) == [0, 8]  # under 2 parts: one
    bounds = _parts(texts, part_chars=250, max_parts=8)
    assert bounds == sorted(set(bounds)) and bounds[0] == 0 and bounds[-1] == len(texts) and len(bounds) == 4
    assert _parts([], part_chars=10, max_parts=4) == [0, 0]
