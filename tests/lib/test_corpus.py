import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.lib.data import corpus


def collect(raw: Path, **kw):
    """collect_documents of the user files under `raw` alone (no stdlib)."""
    return corpus.collect_documents(corpus.CorpusSources(include_stdlib=False, **kw), raw)


def test_stdlib_default_has_modules_tests_and_docs():
    docs = list(corpus.iter_stdlib_documents())
    by_source = {d.source for d in docs}
    assert by_source == {"stdlib-module", "stdlib-test", "stdlib-doc"}
    ids = {d.doc_id for d in docs}
    assert "stdlib/json/decoder.py" in ids
    assert "stdlib-doc/pydoc_topics/assignment" in ids  # the text behind help('assignment')
    assert len(docs) > 1000 and len(ids) == len(docs)
    assert "def JSONArray" in next(d.text for d in docs if d.doc_id == "stdlib/json/decoder.py")


def test_stdlib_parts_select_and_validate():
    docs = list(corpus.iter_stdlib_documents(["docs"]))
    assert docs and {d.source for d in docs} == {"stdlib-doc"}
    with pytest.raises(ValueError, match="stdlib_parts"):
        list(corpus.iter_stdlib_documents(["nonsense"]))


def test_stdlib_max_documents_spreads_evenly():
    docs, stats = corpus.collect_documents(corpus.CorpusSources(stdlib_max_documents=50), Path("/nonexistent"))
    assert stats.documents == 50
    assert len({d.source for d in docs}) >= 2


def test_user_formats(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# heading\nmarkdown body")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    pq.write_table(pa.table({"content": ["row zero", "row one"]}), tmp_path / "d.parquet")
    docs, stats = collect(tmp_path, jsonl_text_field="body", parquet_text_column="content")
    assert {d.doc_id: d.text for d in docs} == {
        "raw/a.txt": "plain text document",
        "raw/c.jsonl#L1": "first",
        "raw/c.jsonl#L3": "second",
        "raw/d.parquet#R0": "row zero",
        "raw/d.parquet#R1": "row one",
        "raw/sub/b.md": "# heading\nmarkdown body",
    }
    assert stats.files_read == 4 and stats.by_source == {"user": 6}


def test_user_globs_select_files(tmp_path: Path):
    (tmp_path / "keep.md").write_text("kept")
    (tmp_path / "skip.txt").write_text("skipped")
    docs, _ = collect(tmp_path, user_globs=("*.md",))
    assert [d.doc_id for d in docs] == ["raw/keep.md"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n{"other": 1}\n', r"bad\.jsonl:3: missing text field 'text'"),
        ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' must be a string"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, content: str, message: str):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(corpus.CorpusFormatError, match=message):
        collect(tmp_path)


def test_parquet_errors_name_file(tmp_path: Path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(corpus.CorpusFormatError, match=r"nocol\.parquet: missing text column 'text'"):
        collect(tmp_path)
    (tmp_path / "nocol.parquet").unlink()
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(corpus.CorpusFormatError, match=r"nulls\.parquet: row 1"):
        collect(tmp_path)
    (tmp_path / "nulls.parquet").unlink()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(corpus.CorpusFormatError, match=r"junk\.parquet: not a readable Parquet file"):
        collect(tmp_path)


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "ok \xff\xfe end"}\n')
    docs, stats = collect(tmp_path)
    by_id = {d.doc_id: d for d in docs}
    assert by_id["raw/latin1.txt"].text == "caf\ufffd cr\ufffdme"
    assert by_id["raw/latin1.txt"].invalid_utf8 == 2
    assert by_id["raw/mixed.jsonl#L1"].text == "ok \ufffd\ufffd end"
    assert stats.invalid_utf8_bytes == 4 and stats.documents_with_invalid_utf8 == 2


def test_non_ascii_round_trips_through_parquet(tmp_path: Path):
    docs = [corpus.Document("x", "user", "p", "naïve 日本語 🙂", 20, 0)]
    corpus.write_documents(docs, tmp_path / "c.parquet")
    assert corpus.read_documents(tmp_path / "c.parquet") == docs


def test_write_is_deterministic(tmp_path: Path):
    docs, _ = corpus.collect_documents(corpus.CorpusSources(stdlib_max_documents=20), tmp_path)
    corpus.write_documents(docs, tmp_path / "a.parquet")
    corpus.write_documents(docs, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
