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


def test_a_few_unusable_jsonl_lines_and_parquet_rows_are_dropped_and_counted(tmp_path: Path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[3], lines[9] = json.dumps({"body": "no text"}), json.dumps({"text": None})
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(29)] + [None]}), tmp_path / "rows.parquet")
    docs, stats = collect(tmp_path)
    assert len(docs) == 38 + 29 and stats.bad.read == 70
    assert stats.bad.rows() == [("missing_field", 3, "rows.jsonl:4, rows.jsonl:10, rows.parquet: row 29")]
    assert "raw/rows.jsonl#L5" in {d.doc_id for d in docs} and "raw/rows.jsonl#L4" not in {d.doc_id for d in docs}
    with pytest.raises(corpus.CorpusFormatError, match=r"rows\.jsonl: 2 of 40 records unusable \(5\.0% > "):
        collect(tmp_path, max_bad_record_share=0.04)


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


def paragraphs(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """n distinct prose paragraphs of `words` words each, wrapped like a book (short lines)."""
    import random
    import textwrap

    rng = random.Random(seed)
    vocab = "the river town bread light winter door letter garden voice morning clock".split()
    return [textwrap.fill(f"Paragraph {i}. " + " ".join(rng.choice(vocab) for _ in range(words)) + ".", 70)
            for i in range(n)]


def spans_of(docs: list[corpus.Document]) -> list[tuple[int, int]]:
    return [tuple(map(int, d.doc_id.rpartition("#chars=")[2].split("-"))) for d in docs]


def test_a_long_text_file_becomes_documents_cut_at_paragraphs(tmp_path: Path):
    paras = paragraphs(120)
    text = "\n\n".join(paras)
    (tmp_path / "book.txt").write_text(text)
    (tmp_path / "short.txt").write_text(paras[0])  # under max_document_chars: one document, as before
    docs, stats = collect(tmp_path, max_document_chars=10_000, split_target_chars=2_000)
    pieces = [d for d in docs if d.doc_id.startswith("raw/book.txt#chars=")]
    assert stats.files_split == 1 and stats.files_read == 2
    assert [d.doc_id for d in docs if not d.doc_id.startswith("raw/book")] == ["raw/short.txt"]
    assert len(pieces) >= len(text) // 2_000
    assert all(len(d.text) <= 2_000 for d in pieces)
    for d, (start, end) in zip(pieces, spans_of(pieces)):  # the id's span gives the piece back
        assert text[start:end] == d.text and d.n_bytes == len(d.text.encode())
    # every paragraph (all shorter than the target) lies whole in exactly one piece
    assert all(sum(p in d.text for d in pieces) == 1 for p in paras)


def test_a_paragraph_longer_than_the_target_is_cut_at_lines_then_inside_a_line(tmp_path: Path):
    lines = [f"line {i} " + "word " * 30 for i in range(40)]
    one_line = " ".join(f"token{i}" for i in range(600))
    text = "\n".join(lines) + "\n\n" + one_line
    (tmp_path / "dump.txt").write_text(text)
    docs, _ = collect(tmp_path, max_document_chars=1_000, split_target_chars=500)
    assert all(len(d.text) <= 500 for d in docs)
    for d, (start, end) in zip(docs, spans_of(docs)):
        assert text[start:end] == d.text
        if end <= len(text) - len(one_line):  # within the lines: whole lines only
            assert d.text.startswith("line ") and d.text.endswith("word")
    assert sum(d.text.count("token") for d in docs) == 600  # the one long line, cut between words


def test_markdown_is_cut_at_sections_and_short_headings_join_the_next_piece(tmp_path: Path):
    sections = [f"## Section {i}\n\n" + "\n\n".join(paragraphs(4, seed=i)) for i in range(6)]
    text = "# Title\n\n" + "\n\n".join(sections)
    (tmp_path / "guide.md").write_text(text)
    docs, _ = collect(tmp_path, max_document_chars=2_000, split_target_chars=1_800)
    # a section (~1,500 characters) fits the target, two do not: one piece per section, the lone
    # title joined to the first
    assert [d.text.partition("\n")[0] for d in docs] == ["# Title"] + [f"## Section {i}" for i in range(1, 6)]
    assert [d.text.count("## Section") for d in docs] == [1] * 6


def test_split_pieces_count_their_own_invalid_bytes(tmp_path: Path):
    text = "\n\n".join(paragraphs(30))
    raw = text.encode().replace(b"Paragraph 3.", b"Paragraph \xff.").replace(b"Paragraph 25.", b"Par\xfe\xfd 25.")
    (tmp_path / "mixed.txt").write_bytes(raw)
    docs, stats = collect(tmp_path, max_document_chars=3_000, split_target_chars=1_000)
    assert len(docs) > 3 and stats.invalid_utf8_bytes == 3 and stats.documents_with_invalid_utf8 == 2
    assert [d.invalid_utf8 for d in docs if "\ufffd" in d.text] == [1, 2]
    assert sum(d.n_bytes for d in docs) <= len(raw)


def test_max_document_chars_zero_never_splits(tmp_path: Path):
    text = "\n\n".join(paragraphs(50))
    (tmp_path / "book.txt").write_text(text)
    docs, stats = collect(tmp_path, max_document_chars=0, split_target_chars=100)
    assert [(d.doc_id, d.text) for d in docs] == [("raw/book.txt", text)] and stats.files_split == 0
    with pytest.raises(ValueError, match="split_target_chars"):
        corpus.CorpusSources(split_target_chars=0)


def test_incoming_files_are_split_with_the_defaults(tmp_path: Path):
    """read_user_file (what incoming batches read) splits as raw_corpus does with its defaults."""
    text = "\n\n".join(paragraphs(400))
    assert len(text) > corpus.MAX_DOCUMENT_CHARS
    (tmp_path / "drop.txt").write_text(text)
    docs = list(corpus.read_user_file(tmp_path / "drop.txt", "incoming/drop"))
    assert len(docs) > 1 and all(len(d.text) <= corpus.SPLIT_TARGET_CHARS for d in docs)
    assert docs[0].doc_id.startswith("incoming/drop#chars=0-")


def test_split_text_spans_are_ordered_and_trimmed():
    text = "\n\n  First paragraph here.  \n\n\nSecond one, a little longer than the first.\n\nEnd.\n"
    spans = corpus.split_text(text, 50)
    # "End." alone would be shorter than a tenth of the target: it joins the piece before it
    assert [text[s:e] for s, e in spans] == ["First paragraph here.",
                                             "Second one, a little longer than the first.\n\nEnd."]
    assert corpus.split_text("", 50) == []


def test_paragraph_spans_are_the_blocks_between_blank_lines():
    text = "  One.\n  still one.\n \n\nTwo is here.\n\n\n" + "long " * 30 + "\n"
    spans = corpus.paragraph_spans(text, 60)
    pieces = [text[s:e] for s, e in spans]
    assert pieces[:2] == ["One.\n  still one.", "Two is here."]
    assert len(pieces) > 3 and all(len(p) <= 60 and set(p.split()) == {"long"} for p in pieces[2:])
    assert corpus.paragraph_spans("\n\n \n", 60) == []
