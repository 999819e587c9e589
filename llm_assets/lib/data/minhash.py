"""MinHash signatures of documents, vectorized with numpy over many documents at once.

    >>> from llm_assets.lib.data.minhash import estimate_jaccard, reference_signature, shingles, signatures
    >>> text = " ".join(f"word{i}" for i in range(200))
    >>> sigs = signatures([text, text.replace("word100", "changed"), ""])    # uint64 (3, 128)
    >>> len(shingles(text)), estimate_jaccard(sigs[0], sigs[1])   # true Jaccard: 191/201 = 0.950
    (196, 0.9453125)
    >>> estimate_jaccard(sigs[2], sigs[2]), bool((reference_signature(text) == sigs[0]).all())
    (0.0, True)

A document's shingles are its word 5-grams (see `shingles`, the plain-Python reference). The fast
path, `signatures`, computes one-permutation MinHash (OPH) signatures for a whole list of texts
without a per-word Python loop:

1. Documents are packed into chunks of ~256 KiB of UTF-8 (buffers reused: big fresh arrays are slow),
   separated by a NUL byte, which is not a word byte, so no word or shingle crosses documents.
2. A 256-entry table lowercases ASCII and zeroes non-word bytes; word starts/ends are where the
   "is word byte" flag flips.
3. Each word gets a polynomial hash sum_j byte_j * B^j mod 2^64 from a wrapping prefix sum, scaled
   back by B^-start (B odd, so invertible mod 2^64), then a splitmix64 finalizer.
4. A shingle's hash is a seeded linear combination of its k word hashes, finalized again.
5. OPH: the top log2(num_perm) bits pick a bucket; each bucket keeps the minimum full 64-bit hash.
   Empty buckets are filled by "optimal densification" (Shrivastava 2017): bucket j copies the first
   non-empty bucket along a fixed, seeded probe order that starts at j. The probe order is shared by
   all documents, so P[sig_a[j] == sig_b[j]] is still the Jaccard similarity, also for short texts.

A document without words has no shingles: its row is all EMPTY (2**64 - 1). Real hashes are capped
at EMPTY - 1, so an empty row matches nothing, and `estimate_jaccard` returns 0.0 for it.

`reference_signature` computes the same signature from the `shingles` set in plain Python; tests use
it to check the fast path bit for bit. Run on its own: `python -m llm_assets.lib.data.minhash FILE...`
prints pairwise estimated Jaccard similarities.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterable, Sequence

import numpy as np

EMPTY = np.uint64(2**64 - 1)  # hash value of an empty bucket / a document without shingles
_M64 = 2**64 - 1
_B = 0x9E3779B97F4A7C15  # odd base of the word polynomial hash
_B_INV = pow(_B, -1, 2**64)
_LEN_MIX = 0xD6E8FEB86659FD93  # mixes the word length into its hash
_TOKEN = re.compile(rb"[a-z0-9_\x80-\xff]+")

# Byte -> lowered byte value for word bytes ([a-z0-9_], A-Z lowered, any byte >= 0x80), 0 otherwise;
# a `bytes.translate` table (faster than a numpy lookup).
_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if (97 <= c <= 122 or 48 <= c <= 57 or c == 95 or c >= 0x80)
                    else 0 for c in range(256))


def _encode(text: str) -> bytes:
    # surrogatepass: text decoded with surrogateescape still encodes, deterministically.
    return text.encode("utf-8", "surrogatepass")


def shingles(text: str, k: int = 5) -> set[bytes]:
    """Reference shingle set: k consecutive lowered words joined by b" ".

    A text with 1..k-1 words has one shingle (all its words); a text with no words has none.
    """
    words = _TOKEN.findall(_encode(text).lower())
    if not words:
        return set()
    if len(words) < k:
        return {b" ".join(words)}
    return {b" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def _check_args(num_perm: int, k: int, seed: int) -> int:
    """Validate arguments; return log2(num_perm)."""
    if not isinstance(num_perm, int) or num_perm < 2 or num_perm > 2**16 or num_perm & (num_perm - 1):
        raise ValueError(f"num_perm must be a power of two in [2, 65536], got {num_perm!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return num_perm.bit_length() - 1


@functools.lru_cache(maxsize=16)
def _shingle_params(k: int, seed: int) -> tuple[np.ndarray, np.uint64]:
    """Seeded odd multipliers (k,) for the word hashes of a shingle, and an additive offset."""
    rng = np.random.default_rng([seed, 1])
    mult = rng.integers(0, 2**64, size=k, dtype=np.uint64, endpoint=False) | np.uint64(1)
    return mult, np.uint64(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False))


@functools.lru_cache(maxsize=8)
def _probe_order(num_perm: int, seed: int) -> np.ndarray:
    """(num_perm, num_perm) int: row j = j, then the other buckets in a seeded random order."""
    rng = np.random.default_rng([seed, 2, num_perm])
    order = np.argsort(rng.random((num_perm, num_perm)), axis=1)
    diag = np.arange(num_perm)
    pos_j = np.argmax(order == diag[:, None], axis=1)  # where j sits in its own row
    order[diag, pos_j] = order[:, 0]  # swap j to the front
    order[:, 0] = diag
    return order


@functools.lru_cache(maxsize=2)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """B^i and B^-i mod 2^64 for i in [0, n), uint64 (n,) each."""
    pw = np.full(n, _B, dtype=np.uint64)
    pw[0] = 1
    np.multiply.accumulate(pw, out=pw)  # uint64 wraps: arithmetic mod 2^64
    inv = np.full(n, _B_INV, dtype=np.uint64)
    inv[0] = 1
    np.multiply.accumulate(inv, out=inv)
    return pw, inv


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array (a bijection with full avalanche)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _densify(sig: np.ndarray, seed: int) -> None:
    """Fill empty buckets of each (n, P) row in place; all-empty rows stay empty.

    Each empty bucket j walks its probe row order[j] until it meets a filled bucket. All walks step
    together, one probe position per round, and a walk leaves once it has found its bucket; a
    document with f filled buckets needs about P / f rounds, so the work is the empty buckets times
    their expected walk, not (rows, P, P).
    """
    num_perm = sig.shape[1]
    filled = sig != EMPTY
    count = filled.sum(axis=1)
    partial = (count > 0) & (count < num_perm)
    row, col = np.nonzero(~filled & partial[:, None])  # empty buckets of rows with a filled one
    order = _probe_order(num_perm, seed)
    for step in range(1, num_perm):  # order[j, 0] == j is empty: start at the second probe
        if len(row) == 0:
            break
        src = order[col, step]
        hit = filled[row, src]
        # sources are filled buckets, which are never written: the order of writes does not matter
        sig[row[hit], col[hit]] = sig[row[hit], src[hit]]
        row, col = row[~hit], col[~hit]


def _chunk(encs: list[bytes], k: int, bits: int, seed: int, out: np.ndarray, work: np.ndarray) -> None:
    """Write the (undensified) OPH signatures of `encs` into `out` (len(encs), P), prefilled EMPTY.

    `work` is a reusable uint64 buffer with at least as many elements as the joined chunk has bytes.
    """
    joined = b"\0" + b"\0".join(encs) + b"\0"  # NUL is not a word byte: words never cross docs
    n = len(joined)
    lowered = np.frombuffer(joined.translate(_WORD_BYTES), dtype=np.uint8)  # (n,) 0 = not a word byte
    is_word = lowered != 0
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])  # alternate (word start - 1, word end - 1)
    if len(edges) == 0:
        return
    pw, inv = _powers(len(work))  # one size per call: the cache hits
    v = work[:n]
    np.copyto(v, lowered)  # widen, then multiply in place: faster than a mixed-type multiply
    v *= pw[:n]
    np.cumsum(v, out=v)  # v[i] = sum_{j<=i} byte_j * B^j mod 2^64
    at_edges = v[edges]
    words = at_edges[1::2] - at_edges[0::2]  # (words,) = sum over the word of byte * B^pos
    edges += 1
    starts, ends = edges[0::2], edges[1::2]  # word = bytes [start, end); start >= 1
    words *= inv[starts]  # shift to B^0 at the word start: position independent
    words += (ends - starts).astype(np.uint64) * np.uint64(_LEN_MIX)
    _mix(words)

    doc_first_byte = np.cumsum([1] + [len(e) + 1 for e in encs[:-1]])  # (docs,)
    per_doc = np.diff(np.searchsorted(starts, doc_first_byte), append=len(starts))  # words of each doc
    word_doc = np.repeat(np.arange(len(encs)), per_doc)  # (words,)
    mult, offset = _shingle_params(k, seed)
    nw = len(words)
    parts, part_docs = [], []
    if nw >= k:  # full windows of k words that stay inside one document
        sh = words[: nw - k + 1] * mult[0]
        for j in range(1, k):
            sh += words[j : nw - k + 1 + j] * mult[j]
        inside = word_doc[: nw - k + 1] == word_doc[k - 1 :]
        parts.append(sh[inside])
        part_docs.append(word_doc[: nw - k + 1][inside])
    short = np.flatnonzero((per_doc > 0) & (per_doc < k))  # docs with one all-words shingle
    if len(short):
        first = (np.cumsum(per_doc) - per_doc)[short]
        sh = words[first] * mult[0]
        for j in range(1, k - 1):
            has = per_doc[short] > j
            sh[has] += words[first[has] + j] * mult[j]
        parts.append(sh)
        part_docs.append(short)
    sh = np.concatenate(parts)
    sh += offset
    _mix(sh)
    np.minimum(sh, EMPTY - np.uint64(1), out=sh)  # EMPTY is reserved for empty buckets
    key = np.concatenate(part_docs) << bits
    key += (sh >> np.uint64(64 - bits)).astype(np.intp)
    np.minimum.at(out.reshape(-1), key, sh)


def signatures(
    texts: Sequence[str], num_perm: int = 128, k: int = 5, seed: int = 1, *, chunk_bytes: int = 1 << 18,
    workers: int | None = None, part_chars: int = 1 << 20,
) -> np.ndarray:
    """OPH MinHash signatures, uint64 (len(texts), num_perm); deterministic for a given seed.

    num_perm must be a power of two (buckets are the top bits of a shingle hash). chunk_bytes only
    trades memory for speed: signatures do not depend on it or on which texts share a call, so they
    do not depend on the process either. `workers` cores (None: every core this process may use;
    1: this process only) share contiguous parts of about `part_chars` characters: this process
    and a pool of `workers - 1` (`_shared_work`); an input of under two parts stays here.
    """
    _check_args(num_perm, k, seed)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None (every core), got {workers!r}")
    if part_chars < 1:
        raise ValueError(f"part_chars must be positive, got {part_chars!r}")
    for i, text in enumerate(texts):  # checked here, so the error names the index in `texts`
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    workers = cores() if workers is None else workers
    bounds = _parts(texts, part_chars, max_parts=16 * workers) if workers > 1 else [0, len(texts)]
    if len(bounds) <= 2:
        return _signatures(texts, num_perm, k, seed, chunk_bytes)
    parts = [texts[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return np.concatenate(_shared_work(parts, workers, (num_perm, k, seed, chunk_bytes)))


def _shared_work(parts: list[Sequence[str]], workers: int, args: tuple) -> list[np.ndarray]:
    """Signatures of each part, by this process and a pool of `workers - 1`.

    A thread hands the pool parts from the back while this process hashes from the front, until
    they meet. A part the pool has not finished when this process reaches it is hashed here, unless
    the pool is known to be up (it finished a part) and has started it, then it is awaited. So a
    pool still starting (as long as hashing tens of MB) never delays the result.
    """
    futures: list[Future | None] = [None] * len(parts)
    taken = [False] * len(parts)  # parts this process has reached
    lock = threading.Lock()

    def hand_out() -> None:
        pool = _pool(workers - 1)  # starting it blocks this thread, not the hashing
        for i in reversed(range(len(parts))):
            with lock:
                if taken[i]:
                    return
            future = pool.submit(_signatures, parts[i], *args)
            with lock:
                futures[i] = future
                if taken[i]:  # reached meanwhile and hashed here
                    future.cancel()
                    return

    threading.Thread(target=hand_out, name="minhash-hand-out", daemon=True).start()
    results = []
    for i, part in enumerate(parts):
        with lock:
            taken[i], future = True, futures[i]
        pool_up = any(f is not None and f.done() and not f.cancelled() for f in futures)
        if future is not None and (future.done() or (pool_up and not future.cancel())):
            results.append(future.result())
            continue
        if future is not None:
            future.cancel()  # not started: the pool skips it; started by a starting pool: hashed twice
        results.append(_signatures(part, *args))
    return results


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def _parts(texts: Sequence[str], part_chars: int, max_parts: int) -> list[int]:
    """Bounds [0, ..., len(texts)] of contiguous parts of about equal characters, at least
    part_chars each (one part when the texts hold fewer than 2 x part_chars)."""
    sizes = np.cumsum([len(t) for t in texts], dtype=np.int64)
    total = int(sizes[-1]) if len(sizes) else 0
    n = min(total // part_chars, max_parts)
    if n < 2:
        return [0, len(texts)]
    cuts = np.searchsorted(sizes, total * np.arange(1, n) / n)  # a part ends after the text crossing i/n
    return sorted({0, *(int(c) + 1 for c in cuts), len(texts)})


_POOL: tuple[int, int, ProcessPoolExecutor] | None = None  # (owner pid, workers, pool), kept for reuse
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of `workers`, started once per process and size, then reused (starting one
    costs about as much as hashing tens of MB). forkserver, not fork: callers (Dagster) run
    threads, and a forked copy of a held lock never unlocks; the server preloads numpy and this
    module, so each worker is a cheap fork of it."""
    global _POOL
    with _POOL_LOCK:
        # a pool whose worker died (killed, out of memory) is broken for good: start another
        if _POOL is not None and _POOL[:2] == (os.getpid(), workers) and not getattr(_POOL[2], "_broken", False):
            return _POOL[2]
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False, cancel_futures=True)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        _POOL = (os.getpid(), workers, ProcessPoolExecutor(workers, mp_context=context))
        return _POOL[2]


def _signatures(texts: Sequence[str], num_perm: int, k: int, seed: int, chunk_bytes: int) -> np.ndarray:
    """`signatures` in this process (arguments checked by it)."""
    bits = num_perm.bit_length() - 1
    sig = np.full((len(texts), num_perm), EMPTY, dtype=np.uint64)
    work = np.empty(chunk_bytes + 2, dtype=np.uint64)
    lo, size, encs = 0, 0, []
    for i, text in enumerate(texts):
        enc = _encode(text)
        if encs and size + len(enc) + 1 > chunk_bytes:
            _chunk(encs, k, bits, seed, sig[lo:i], work)
            lo, size, encs = i, 0, []
        encs.append(enc)
        size += len(enc) + 1
        if size + 1 > len(work):  # one text bigger than a chunk
            work = np.empty(size + 1, dtype=np.uint64)
    if encs:
        _chunk(encs, k, bits, seed, sig[lo:], work)
    _densify(sig, seed)
    return sig


def _word_hash_py(word: bytes) -> int:
    h = sum(b * pow(_B, j, 2**64) for j, b in enumerate(word))
    return _mix_py((h + len(word) * _LEN_MIX) & _M64)


def _mix_py(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def reference_signature(text: str, num_perm: int = 128, k: int = 5, seed: int = 1) -> np.ndarray:
    """Slow plain-Python twin of `signatures` for one text, built from the `shingles` set: uint64 (P,)."""
    bits = _check_args(num_perm, k, seed)
    mult, offset = _shingle_params(k, seed)
    sig = np.full((1, num_perm), EMPTY, dtype=np.uint64)
    for shingle in shingles(text, k):
        h = sum(int(m) * _word_hash_py(w) for m, w in zip(mult, shingle.split(b" ")))
        h = min(_mix_py((h + int(offset)) & _M64), int(EMPTY) - 1)
        sig[0, h >> (64 - bits)] = min(int(sig[0, h >> (64 - bits)]), h)
    _densify(sig, seed)
    return sig[0]


def is_empty(sig: np.ndarray) -> np.ndarray | bool:
    """True for signature rows of documents without shingles; works on (P,) or (n, P)."""
    return np.all(sig == EMPTY, axis=-1)


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal positions of two signatures; 0.0 if either document has no shingles."""
    if a.shape != b.shape:
        raise ValueError(f"signature shapes differ: {a.shape} vs {b.shape}")
    if is_empty(a) or is_empty(b):
        return 0.0
    return float(np.mean(a == b))


def _main(paths: Iterable[str]) -> None:
    paths = list(paths)
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
    sig = signatures(texts)
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            print(f"{estimate_jaccard(sig[i], sig[j]):.3f}  {paths[i]}  {paths[j]}")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
