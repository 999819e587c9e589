"""Incoming batches: which files are ready, batch keys, and cleaning + dedup against the corpus."""

import functools
import json
import os
import time

import numpy as np
import pytest

from llm_assets.lib.data import ingest
from llm_assets.lib.data.clean import CleanRules, NoDocumentsLeftError
from llm_assets.lib.data.corpus import CorpusFormatError, Document
from llm_assets.lib.data.dedup import SIGNATURES, DedupParams, deduplicate, text_sha256, write_shards
from llm_assets.lib.data.minhash import signatures


def words(seed: int, n: int = 80) -> str:
    """A document of distinct-looking prose (word 5-gram shingles differ between seeds)."""
    return " ".join(f"w{seed}x{i % 37}y{(i * seed) % 11}" for i in range(n)) + " the end of the text."


def doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, "user", "f", text, len(text))


def aged(path, seconds=60):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_scan_waits_for_files_being_written_and_skips_seen_ones(tmp_path):
    done, fresh = tmp_path / "a.jsonl", tmp_path / "b.txt"
    done.write_text("{}\n")
    aged(done)
    fresh.write_text("still writing")
    for name in (".hidden.txt", "c.txt.tmp", "d.part", "notes.py"):  # hidden, temp names, unsupported type
        (tmp_path / name).write_text("x")
        aged(tmp_path / name)
    ready, settling = ingest.scan(tmp_path, {}, settle_s=10)
    assert ready == [done] and settling == [fresh]
    ready, settling = ingest.scan(tmp_path, {"a.jsonl": ingest.stamp(done)}, settle_s=10)
    assert ready == [] and settling == [fresh]
    aged(fresh)
    assert ingest.scan(tmp_path, {"a.jsonl": ingest.stamp(done)}, settle_s=10) == ([fresh], [])


def test_links_in_the_drop_zone_are_never_read_and_are_named(tmp_path):
    incoming, outside = tmp_path / "incoming", tmp_path / "outside"
    incoming.mkdir()
    outside.mkdir()
    secret = outside / "passwd.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    (incoming / "passwd.txt").symlink_to(secret)            # a symlink to a file outside the project
    (incoming / "gone.jsonl").symlink_to(outside / "nothing")  # a dangling one
    os.link(secret, incoming / "hard.txt")                  # a second name for the outside file
    plain = incoming / "batch.jsonl"
    plain.write_text('{"text": "a plain file"}\n')
    for path in (plain, incoming / "hard.txt"):
        aged(path)
    assert ingest.candidates(incoming) == [plain]
    assert ingest.scan(incoming, {}, settle_s=10) == ([plain], [])
    skipped = ingest.skipped_links(incoming)
    assert [s.split(":")[0] for s in skipped] == ["gone.jsonl", "hard.txt", "passwd.txt"]
    assert f"a symbolic link (to {secret})" in skipped[2] and "a hard link (2 names" in skipped[1]


def test_batch_key_follows_name_and_content(tmp_path):
    a = tmp_path / "new data (v2).jsonl"
    a.write_text('{"text": "x"}\n')
    key = ingest.batch_key(a)
    assert key.startswith("new_data_v2_.jsonl-") and len(key.rsplit("-", 1)[1]) == 8
    assert ingest.batch_key(a) == key
    assert ingest.find_batch_file(tmp_path, key) == a
    a.write_text('{"text": "y"}\n')
    assert ingest.batch_key(a) != key
    with pytest.raises(FileNotFoundError, match="changed or removed"):
        ingest.find_batch_file(tmp_path, key)


def test_ingest_removes_what_the_corpus_already_has_and_duplicates_within_the_batch():
    params = DedupParams()
    index = ingest.CorpusIndex(params)
    corpus = [words(s) for s in range(1, 6)]
    index.add([f"c{i}" for i in range(5)], corpus)
    near = corpus[1].replace("the end of the text.", "the end of this text.")  # one word changed
    batch = [doc("b0", corpus[0]), doc("b1", near), doc("b2", words(50)), doc("b3", words(50) + " "),
             doc("b4", words(51)), doc("b5", "too short")]
    result = ingest.ingest(batch, index, CleanRules(), params)
    assert [d.doc_id for d in result.kept] == ["b2", "b4"]
    dups = {d[0]: d[1:3] for d in result.duplicates}
    assert dups["b0"] == ("c0", "exact")
    assert dups["b1"] == ("c1", "near")
    assert dups["b3"] == ("b2", "exact")  # trailing whitespace is normalized away, then it is b2
    assert result.clean_report.removed["too_short"] == 1
    assert set(result.split.values()) <= {"train", "validation"}


def test_a_batch_that_cleaning_empties_says_why():
    with pytest.raises(NoDocumentsLeftError, match="too_short"):
        ingest.ingest([doc("b", "tiny")], ingest.CorpusIndex(DedupParams()), CleanRules(), DedupParams())


def test_written_batches_read_back_by_split(tmp_path):
    params = DedupParams(validation_fraction=0.5)
    result = ingest.ingest([doc(f"b{i}", words(100 + i)) for i in range(20)], ingest.CorpusIndex(params),
                           CleanRules(), params)
    (tmp_path / "k1").mkdir()
    ingest.write_batch(result, tmp_path / "k1", {"key": "k1"})
    (tmp_path / "half-written").mkdir()  # no batch.json: not a batch
    table = ingest.read_batches(tmp_path)
    assert table.num_rows == 20
    assert ingest.read_batches(tmp_path, "train").num_rows + ingest.read_batches(tmp_path, "validation").num_rows == 20
    assert ingest.read_batches(tmp_path, exclude="k1").num_rows == 0
    assert json.loads((tmp_path / "k1/batch.json").read_text()) == {"key": "k1"}
    info, documents = ingest.read_batch(tmp_path / "k1")
    assert info == {"key": "k1"} and documents.to_pylist() == table.to_pylist()
    assert documents.column("doc_id").to_pylist() == [d.doc_id for d in result.kept]
    assert ingest.is_batch(tmp_path / "k1") and not ingest.is_batch(tmp_path / "half-written")
    with pytest.raises(FileNotFoundError, match="half-written: not an ingested batch"):
        ingest.read_batch(tmp_path / "half-written")


def test_malformed_batch_file_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(CorpusFormatError, match=r"bad.jsonl:2: field 'text' must be a string"):
        ingest.read_batch_file(f, "bad.jsonl-1")
    f.write_text('{"text": "fine", "path": "pkg/mod.py"}\n')
    [d] = ingest.read_batch_file(f, "bad.jsonl-1")
    assert d.doc_id == "incoming/bad.jsonl-1#L1:pkg/mod.py"  # a named .py document yields instruction pairs


def test_known_signatures_are_read_not_hashed_and_older_artifacts_are_hashed(tmp_path):
    params = DedupParams(validation_fraction=0.5)
    shards, lake = tmp_path / "shards", tmp_path / "lake"
    shards.mkdir()
    write_shards(deduplicate([doc(f"c{i}", words(i)) for i in range(1, 7)], params), shards, 1.0, params)
    for key, seeds in (("k1", [10, 11]), ("k2", [12])):
        result = ingest.ingest([doc(f"{key}/{s}", words(s)) for s in seeds], ingest.CorpusIndex(params),
                               CleanRules(), params)
        (lake / key).mkdir(parents=True)
        ingest.write_batch(result, lake / key, {"key": key})
    (lake / "k2" / SIGNATURES).unlink()  # a batch ingested before signatures were kept: hashed from its text
    corpus, k1, k2 = ingest.known_signatures(shards, lake, params)
    assert sorted(corpus.doc_ids) == [f"c{i}" for i in range(1, 7)] and k1.doc_ids == ["k1/10", "k1/11"]
    assert k2.doc_ids == ["k2/12"] and k2.sha256 == [text_sha256(words(12))]
    np.testing.assert_array_equal(k2.values, signatures([words(12)]))
    np.testing.assert_array_equal(k1.values, signatures([words(10), words(11)]))
    assert [s.doc_ids for s in ingest.known_signatures(shards, lake, params, exclude="k1")][1] == ["k2/12"]

    # ingesting from them finds the same duplicates as adding the texts
    batch = [doc("n1", words(3)), doc("n2", words(11).replace("the end of the text.", "the end of this text.")),
             doc("n3", words(99))]
    load = functools.partial(ingest.known_signatures, shards, lake, params)
    result = ingest.ingest(batch, ingest.CorpusIndex(params), CleanRules(), params, batch="k3", load=load)
    assert [d.doc_id for d in result.kept] == ["n3"]
    assert [d[:3] for d in result.duplicates] == [("n1", "c3", "exact"), ("n2", "k1/11", "near")]
    assert result.signatures.doc_ids == ["n3"] and result.signatures.values.shape == (1, 128)


def test_lsh_storage_must_be_a_redis_url():
    with pytest.raises(ValueError, match="lsh_storage must be '' .in memory. or redis://host:port/db"):
        ingest.CorpusIndex(DedupParams(), "localhost:6379")
    assert ingest.redis_connection("redis://127.0.0.1:6390/2") == {"host": "127.0.0.1", "port": 6390, "db": 2}
    assert ingest.IndexSettings().lsh_storage == ""  # in memory unless set
