import json
import random
import sysconfig
from pathlib import Path

import pytest

from llm_assets.lib.data.corpus import Document
from llm_assets.lib.data.dedup import (DedupParams, deduplicate, read_duplicates, read_manifest, read_params, read_split,
                                      shard_files, split_of, write_shards)

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
