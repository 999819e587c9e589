"""One shared near-duplicate index in a real redis-server (started by the test on loopback, stopped
after): batches ingested at the same time by two processes deduplicate against each other and the
corpus, which the index loads once from the signatures persisted beside the shards."""

from __future__ import annotations

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import redis

from llm_assets.lib.common.atomic import atomic_dir
from llm_assets.lib.data import ingest
from llm_assets.lib.data.clean import CleanRules
from llm_assets.lib.data.corpus import Document
from llm_assets.lib.data.dedup import DedupParams, deduplicate, write_shards

PARAMS = DedupParams(validation_fraction=0.3)


def words(seed: int, n: int = 120) -> str:
    """Prose whose word 5-grams differ between seeds."""
    return " ".join(f"w{seed}x{i % 41}y{(i * seed) % 13}" for i in range(n)) + " and that is all."


def doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, "user", doc_id, text, len(text.encode()))


SHARED = words(500)  # arrives in both batches: once as is, once with one word changed
OWN = 12  # documents of each batch's own before the shared one: both workers reach it at about the same time
BATCHES = {
    "a.jsonl-00000001": [*(doc(f"a/own{i}", words(1000 + i)) for i in range(OWN)), doc("a/shared", SHARED),
                         doc("a/corpus", words(3))],
    "b.jsonl-00000002": [*(doc(f"b/own{i}", words(2000 + i)) for i in range(OWN)),
                         doc("b/shared", SHARED.replace("and that is all.", "and that was all."))],
}


def write_corpus(shards: Path) -> None:
    result = deduplicate([doc(f"c{i:02d}", words(i)) for i in range(12)], PARAMS)
    shards.mkdir()
    write_shards(result, shards, target_mb=1.0, params=PARAMS)


def ingest_batch(key: str, shards: str, lake: str, url: str, start_at: float) -> tuple[list[str], list[tuple]]:
    """One worker: ingest batch `key` against the shared index, write it, return (kept, duplicates)."""
    shards, lake = Path(shards), Path(lake)
    index = ingest.CorpusIndex(PARAMS, url, ingest.corpus_id(shards))
    time.sleep(max(0.0, start_at - time.time()))  # both workers reach the index at the same moment
    load = functools.partial(ingest.known_signatures, shards, lake, PARAMS, exclude=key)
    result = ingest.ingest(BATCHES[key], index, CleanRules(), PARAMS, batch=key, load=load)
    with atomic_dir(lake / key) as tmp:
        ingest.write_batch(result, tmp, {"key": key})
    return [d.doc_id for d in result.kept], result.duplicates


def test_two_processes_do_not_both_keep_a_shared_near_duplicate(tmp_path, redis_url):
    shards, lake = tmp_path / "shards", tmp_path / "lake"
    write_corpus(shards)
    lake.mkdir()
    context = multiprocessing.get_context("fork")  # a copy of this process: nothing to import again
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        start_at = time.time() + 1.0  # both forked and waiting by then
        futures = {key: pool.submit(ingest_batch, key, str(shards), str(lake), redis_url, start_at)
                   for key in BATCHES}
        (kept_a, dups_a), (kept_b, dups_b) = (futures[key].result(timeout=120) for key in BATCHES)

    # exactly one of the two copies survives, and the other names it as its near duplicate
    assert ("a/shared" in kept_a) != ("b/shared" in kept_b)
    dup = next(d for d in dups_a + dups_b if d[0].endswith("/shared"))
    assert dup[1] in {"a/shared", "b/shared"} - {dup[0]} and dup[2] == "near" and dup[3] >= PARAMS.threshold
    assert len(set(kept_a) - {"a/shared"}) == len(set(kept_b) - {"b/shared"}) == OWN
    assert ("a/corpus", "c03", "exact", 1.0) in dups_a  # the corpus came from the persisted signatures

    # the index lives in Redis: the 12 corpus documents and the 5 the batches kept
    name = f"llm_assets:lsh:{ingest.corpus_id(shards)}:".encode()
    assert redis.Redis.from_url(redis_url).hlen(name + b"sig") == 12 + len(kept_a) + len(kept_b)
    # a third process needs no load: what both batches kept is already shared
    index = ingest.CorpusIndex(PARAMS, redis_url, ingest.corpus_id(shards))
    with index.session():
        assert index.match(words(2007), index.signatures([words(2007)])[0]) == ("b/own7", "exact", 1.0)


def test_a_batch_run_again_does_not_match_itself(tmp_path, redis_url):
    shards, lake = tmp_path / "shards", tmp_path / "lake"
    write_corpus(shards)
    lake.mkdir()
    key = "a.jsonl-00000001"
    first = ingest_batch(key, str(shards), str(lake), redis_url, 0.0)
    again = ingest_batch(key, str(shards), str(lake), redis_url, 0.0)  # a repeated or failed-then-retried run
    assert again == first and first[0] == [d.doc_id for d in BATCHES[key][:-1]]  # all but the corpus's
    # another corpus version (new shards) gets an index of its own
    other = tmp_path / "other"
    result = deduplicate([doc("x", words(900)), doc("y", words(901))], PARAMS)
    other.mkdir()
    write_shards(result, other, target_mb=1.0, params=PARAMS)
    assert ingest.corpus_id(other) != ingest.corpus_id(shards)
