import json
import random

import numpy as np
import sysconfig
from pathlib import Path

import pytest

from llm_assets.lib.data.corpus import CorpusSources, Document, collect_documents
from llm_assets.lib.data.dedup import (SIGNATURES, DedupParams, Signatures, TooFewDocumentsError, deduplicate,
                                      read_duplicates, read_manifest, read_params, read_signatures, read_split,
                                      shard_files, split_of, text_sha256, write_shards, write_signatures)
from llm_assets.lib.data.minhash import signatures

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def real_doc(doc_id: str, rel: str) -> Document:
    text = (STDLIB / rel).read_text()
    return Document(doc_id, "stdlib-module", rel, text, len(text.encode()))


def edited(doc: Document, doc_id: str, rate: float, seed: int = 0) -> Document:
    rng = random.Random(seed)
    words = doc.text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * rate)):
        words[i] = f"edit{rng.randrange(10**6)}"
    text = " ".join(words)
    return Document(doc_id, doc.source, doc.path, text, len(text.encode()))


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    rels = ["json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "shlex.py", "fnmatch.py",
            "glob.py", "bisect.py", "heapq.py", "string.py", "keyword.py", "colorsys.py"]
    docs = [real_doc(f"d{i:02d}", rel) for i, rel in enumerate(rels)]
    docs.append(Document("z-exact", "user", "p", docs[0].text, 0))  # exact copy of d00
    docs.append(edited(docs[1], "z-near", 0.003))  # near copy of d01
    docs.append(Document("z-near-copy", "user", "p", docs[-1].text, 0))  # exact copy of z-near
    docs.append(edited(docs[2], "z-far", 0.3))  # heavily edited: not a near duplicate
    return docs


def test_exact_and_near_duplicates(corpus):
    result = deduplicate(corpus, DedupParams())
    removed = {d.doc_id: d for d in result.duplicates}
    assert set(removed) == {"z-exact", "z-near", "z-near-copy"}
    assert removed["z-exact"].kind == "exact" and removed["z-exact"].kept_doc_id == "d00"
    assert removed["z-near"].kind == "near" and removed["z-near"].kept_doc_id == "d01"
    assert removed["z-near"].jaccard >= 0.8
    # an exact copy of a removed near duplicate points at the cluster's kept document
    assert removed["z-near-copy"].kept_doc_id == "d01"
    assert result.cluster_size["d00"] == 2 and result.cluster_size["d01"] == 3
    assert result.exact_duplicates == 2 and result.near_duplicates == 1
    assert result.duplicate_rate == pytest.approx(3 / len(corpus))
    assert "z-far" in {d.doc_id for d in result.kept}


def test_split_is_deterministic_and_keeps_clusters_together(corpus):
    a = deduplicate(corpus, DedupParams(validation_fraction=0.5))
    b = deduplicate(list(reversed(corpus)), DedupParams(validation_fraction=0.5))
    assert a.split == b.split
    assert set(a.split.values()) == {"train", "validation"}
    removed = {d.doc_id for d in a.duplicates}
    assert not removed & set(a.split)  # removed members are on neither side
    assert split_of("some-cluster", 0.1) == split_of("some-cluster", 0.1)
    share = sum(split_of(f"c{i}", 0.1) == "validation" for i in range(5000)) / 5000
    assert 0.08 < share < 0.12


def test_write_shards_respects_target_size(tmp_path, corpus):
    result = deduplicate(corpus, DedupParams(validation_fraction=0.3))
    manifest = write_shards(result, tmp_path, target_mb=0.02)
    biggest_doc = max(len(d.text.encode()) for d in result.kept)
    for shard in manifest["shards"]:
        assert shard["text_bytes"] < 20_000 + biggest_doc
        assert (tmp_path / shard["file"]).stat().st_size == shard["file_bytes"]
    assert len(manifest["shards"]) > 2
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "validation")
    assert train.num_rows + val.num_rows == len(result.kept)
    assert set(train.column("doc_id").to_pylist()).isdisjoint(val.column("doc_id").to_pylist())
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(tmp_path) == manifest
    assert [p.name for p in shard_files(tmp_path, "train")] == [s["file"] for s in manifest["shards"] if s["split"] == "train"]
    assert shard_files(tmp_path, "test") == []


def test_duplicates_and_params_read_back(tmp_path, corpus):
    params = DedupParams(threshold=0.7, validation_fraction=0.3)
    result = deduplicate(corpus, params)
    write_shards(result, tmp_path, target_mb=1.0, params=params)
    assert read_params(tmp_path) == params
    dups = read_duplicates(tmp_path).to_pylist()
    assert [(d["doc_id"], d["kept_doc_id"], d["kind"]) for d in dups] == [
        (d.doc_id, d.kept_doc_id, d.kind) for d in result.duplicates] and dups


def test_bad_params():
    with pytest.raises(ValueError, match="threshold"):
        deduplicate([], DedupParams(threshold=0))
    with pytest.raises(ValueError, match="validation_fraction"):
        deduplicate([], DedupParams(validation_fraction=1.0))


def prose(n_paragraphs: int, seed: int) -> str:
    """Distinct paragraphs of random words (no two are near duplicates), separated by blank lines."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    return "\n\n".join(" ".join(rng.choice(vocab) for _ in range(50)) for _ in range(n_paragraphs))


def user_doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, "user", doc_id, text, len(text.encode()))


def test_a_corpus_the_hash_rule_splits_keeps_the_cluster_grain(corpus):
    """What the stdlib demo gets: the split is exactly the per-cluster hash rule, as before."""
    result = deduplicate(corpus, DedupParams(validation_fraction=0.5))
    assert result.split_grain == "cluster" and result.split_reason == ""
    assert result.split == {d.doc_id: split_of(d.doc_id, 0.5) for d in result.kept}


def test_too_few_documents_for_the_hash_rule_split_by_document():
    ids = ["notes-a", "notes-b", "notes-d"]
    assert {split_of(i, 0.1) for i in ids} == {"train"}  # the hash rule would leave validation empty
    docs = [user_doc(i, prose(3, seed)) for seed, i in enumerate(ids)]
    result = deduplicate(docs + [user_doc("notes-copy", docs[0].text)], DedupParams(validation_fraction=0.1))
    assert result.split_grain == "document" and "left validation empty with 3 documents" in result.split_reason
    assert sorted(result.split.values()) == ["train", "train", "validation"]
    assert "notes-copy" not in result.split and result.cluster_size["notes-a"] == 2  # duplicates stay together
    again = deduplicate(list(reversed(docs)), DedupParams(validation_fraction=0.1))
    assert again.split == result.split  # deterministic


def test_one_document_is_split_by_paragraph_with_the_tail_held_out(tmp_path):
    text = prose(30, seed=1)
    repeated = text.split("\n\n")[3]
    text += "\n\n" + repeated  # the last paragraph repeats the fourth: it must not leak into validation
    params = DedupParams(validation_fraction=0.2)
    result = deduplicate([user_doc("raw/book.txt", text)], params)
    assert result.split_grain == "paragraph" and "held out for validation" in result.split_reason
    spans = [tuple(map(int, d.doc_id.removeprefix("raw/book.txt#chars=").split("-"))) for d in result.kept]
    assert [text[s:e] for s, e in spans] == [d.text for d in result.kept]
    assert spans == sorted(spans)  # kept in text order
    sides = [result.split[d.doc_id] for d in result.kept]
    n_val = sides.count("validation")
    assert n_val >= 1 and sides == ["train"] * (len(sides) - n_val) + ["validation"] * n_val  # the tail
    assert 0.1 < sum(len(d.text) for d in result.kept if result.split[d.doc_id] == "validation") / len(text) < 0.35
    # the repeat is a duplicate paragraph: removed, and its first occurrence kept, in train
    assert [result.split[d.doc_id] for d in result.kept if d.text == repeated] == ["train"]
    assert [(d.doc_id, d.kind) for d in result.duplicates] == [(f"raw/book.txt#chars={len(text) - len(repeated)}-"
                                                                 f"{len(text)}", "exact")]
    manifest = write_shards(result, tmp_path, target_mb=1.0, params=params)
    assert manifest["split"] == {"grain": "paragraph", "reason": result.split_reason}
    assert read_split(tmp_path, "validation").num_rows == n_val


def test_a_document_that_cannot_be_cut_says_how_many_documents_to_add():
    with pytest.raises(TooFewDocumentsError, match="needs at least 2 documents.*add at least 1 more document"):
        deduplicate([user_doc("raw/one.txt", "same words " * 40)], DedupParams(validation_fraction=0.1))
    with pytest.raises(TooFewDocumentsError, match="there are none: add at least 2 documents"):
        deduplicate([], DedupParams(validation_fraction=0.1))
    # validation_fraction 0 asks for no validation: nothing is forced
    assert deduplicate([user_doc("a", prose(3, 0))], DedupParams(validation_fraction=0.0)).split == {"a": "train"}


def test_dedup_works_across_the_pieces_of_split_files(tmp_path):
    """Two long files, the second an edited copy of the first: their pieces are near duplicates."""
    text = prose(60, seed=2)
    (tmp_path / "book.txt").write_text(text)
    (tmp_path / "book-2nd-edition.txt").write_text(text.replace("w17 ", "w17x ", 3))
    docs, stats = collect_documents(CorpusSources(include_stdlib=False, max_document_chars=5_000,
                                                  split_target_chars=2_000), tmp_path)
    assert stats.files_split == 2 and len(docs) > 10
    result = deduplicate(docs, DedupParams(validation_fraction=0.2))
    kinds = {d.kind for d in result.duplicates}
    assert len(result.duplicates) == len(docs) // 2 and kinds == {"exact", "near"}
    # one copy of each piece is kept: the one with the smaller doc_id ("-" sorts before ".")
    assert all(d.doc_id.startswith("raw/book-2nd-edition.txt#chars=") for d in result.kept)
    assert set(result.split.values()) == {"train", "validation"} and result.split_grain == "cluster"


def test_the_kept_documents_signatures_are_written_beside_the_shards(tmp_path, corpus):
    params = DedupParams(validation_fraction=0.3, num_perm=64)
    result = deduplicate(corpus, params)
    write_shards(result, tmp_path, target_mb=1.0, params=params)
    sigs = read_signatures(tmp_path / SIGNATURES, params)
    texts = [d.text for d in result.kept]
    assert sigs.doc_ids == [d.doc_id for d in result.kept]
    assert sigs.sha256 == [text_sha256(t) for t in texts]
    np.testing.assert_array_equal(sigs.values, signatures(texts, num_perm=64))
    with pytest.raises(ValueError, match="num_perm.*materialize the asset that wrote them again"):
        read_signatures(tmp_path / SIGNATURES, DedupParams())  # 128 positions: not comparable
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_signatures_round_trip_empty_and_bad_shapes(tmp_path):
    params = DedupParams()
    empty = Signatures([], [], np.zeros((0, 128), np.uint64))
    write_signatures(tmp_path / "s.parquet", empty, params)
    back = read_signatures(tmp_path / "s.parquet", params)
    assert back.doc_ids == [] and back.values.shape == (0, 128)
    with pytest.raises(ValueError, match="expected \\(1, 128\\)"):
        write_signatures(tmp_path / "s.parquet", Signatures(["a"], [b"x" * 32], np.zeros((1, 64), np.uint64)), params)
