r"""Raw corpus: documents from the embedded default (this Python's standard library) and user files.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.data.corpus import (CorpusSources, collect_documents, corpus_file,
    ...                                         read_documents, write_documents)
    >>> raw = Path(tempfile.mkdtemp())
    >>> _ = (raw / "notes.md").write_text("# Notes\nA user file is one document.\n")
    >>> _ = (raw / "rows.jsonl").write_bytes(b'{"text": "one per line"}\n{"text": "bad byte \xff"}\n')
    >>> docs, stats = collect_documents(CorpusSources(include_stdlib=False), raw)
    >>> [d.doc_id for d in docs], stats.documents, stats.invalid_utf8_bytes
    (['raw/notes.md', 'raw/rows.jsonl#L1', 'raw/rows.jsonl#L2'], 3, 1)
    >>> docs[2].text
    'bad byte \ufffd'
    >>> write_documents(docs, corpus_file(raw))             # corpus.parquet
    >>> read_documents(corpus_file(raw)) == docs
    True

Every document is a `Document(doc_id, source, path, text, n_bytes, invalid_utf8)`.

- Embedded default, present on every machine: the standard library's module sources
  (`stdlib-module`), its own test suite (`stdlib-test`, rich in genuine near-duplicates) and the
  documentation text that ships with it (`stdlib-doc`: the pydoc help topics from `pydoc_data` and
  the `.txt` documentation files in the library tree).
- User files under `raw_dir`: `.txt` and `.md` (one document per file), `.jsonl` (one document per
  line, text in a configurable field) and `.parquet` (one document per row, configurable column).

A `.txt`/`.md` file longer than `max_document_chars` (a book, a dump, a scrape) becomes several
documents of about `split_target_chars` each (`split_text`): cut at paragraph boundaries (blank
lines; in Markdown headings first), falling back to lines, sentences and words only inside a
paragraph longer than the target. Each piece's id names the file and its character span in the
decoded file, `raw/book.txt#chars=0-7996`, so `text[start:end]` of the file gives the piece back
(pieces lose only the whitespace between them). Dedup then works across the pieces like across
any documents.

    >>> _ = (raw / "book.txt").write_text("\n\n".join(f"Paragraph {i} of a long book." for i in range(9)))
    >>> docs, stats = collect_documents(CorpusSources(include_stdlib=False, max_document_chars=200,
    ...                                               split_target_chars=100), raw)
    >>> [d.doc_id for d in docs if d.doc_id.startswith("raw/book")], stats.files_split
    (['raw/book.txt#chars=0-85', 'raw/book.txt#chars=87-172', 'raw/book.txt#chars=174-259'], 1)

Invalid UTF-8 is never fatal and never silent: each undecodable byte becomes U+FFFD and is counted
per document (`invalid_utf8`); the cleaning stage drops documents where that share is high.
A record that parses but cannot be used (a JSONL line without the text field or with a non-string
one, a null Parquet row) is dropped and counted per reason (`CorpusStats.bad`, bad_records.py); a
file fails only when their share is above `max_bad_record_share`. Malformed structure (bad JSON, a
missing or non-string column) raises `CorpusFormatError` naming the file and line (or row).

    >>> _ = (raw / "rows.jsonl").write_text('{"text": "kept"}\n' * 30 + '{"title": "no text"}\n')
    >>> docs, stats = collect_documents(CorpusSources(include_stdlib=False, user_globs=["*.jsonl"]), raw)
    >>> len(docs), dict(stats.bad.dropped), stats.bad.where
    (30, {'missing_field': 1}, {'missing_field': ['rows.jsonl:31']})
"""

from __future__ import annotations

import json
import re
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field
from semantic_text_splitter import MarkdownSplitter, TextSplitter

from llm_assets.lib.data.bad_records import (MAX_BAD_RECORD_SHARE, BadRecord, BadRecords, CorpusFormatError, RecordRules,
                                             read_records)

USER_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt", ".md")  # one document per file, split when long
# Defaults of the two CorpusSources fields below, also read_user_file's (incoming batches use them).
MAX_DOCUMENT_CHARS = 100_000
SPLIT_TARGET_CHARS = 8_000
STDLIB_PARTS = ("modules", "tests", "docs")
_SURROGATE = re.compile("[\udc80-\udcff]")
_BLANK_LINES = re.compile(r"\n\s*\n")  # a paragraph break, with any whitespace in and after it

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("text", pa.string()),
        ("n_bytes", pa.int64()),
        ("invalid_utf8", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str
    path: str
    text: str
    n_bytes: int
    invalid_utf8: int = 0


class CorpusSources(RecordRules):
    """What goes into the raw corpus, besides the raw_dir it reads; the launchpad of `raw_corpus`."""

    model_config = ConfigDict(frozen=True)

    include_stdlib: bool = Field(True, description="Include the embedded default corpus: this Python's standard library.")
    stdlib_parts: list[str] = Field(list(STDLIB_PARTS), description="Which stdlib parts: 'modules' (source), 'tests' "
                                    "(its test suite), 'docs' (pydoc topics, .txt docs).")
    stdlib_max_documents: int = Field(0, description="Keep at most this many stdlib documents, spread evenly (0 = all).")
    user_globs: list[str] = Field(["**/*.txt", "**/*.md", "**/*.jsonl", "**/*.parquet"],
                                  description="Glob patterns, relative to raw_dir (data/raw/), selecting the user's corpus files.")
    jsonl_text_field: str = Field("text", description="Field holding the document text in .jsonl files.")
    parquet_text_column: str = Field("text", description="Column holding the document text in .parquet files.")
    max_document_chars: int = Field(MAX_DOCUMENT_CHARS, ge=0, description="A .txt/.md file longer than this many "
                                    "characters is split into several documents (0 = never split).")
    split_target_chars: int = Field(SPLIT_TARGET_CHARS, gt=0, description="Size, in characters, of the documents a "
                                    "long .txt/.md file is split into: cut at paragraph boundaries, and inside a "
                                    "paragraph only when it is longer than this.")


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    invalid_utf8_bytes: int = 0
    documents_with_invalid_utf8: int = 0
    by_source: Counter = field(default_factory=Counter)
    files_read: int = 0
    files_split: int = 0  # .txt/.md files longer than max_document_chars, read as several documents
    bad: BadRecords = field(default_factory=BadRecords)  # .jsonl lines and .parquet rows dropped, per reason


def decode_counting(raw: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Decode, replacing each undecodable byte with U+FFFD; returns (text, bytes replaced)."""
    return _replace_escaped(raw.decode(encoding, errors="surrogateescape"))


def _replace_escaped(escaped: str) -> tuple[str, int]:
    """(text with each surrogate-escaped byte as U+FFFD, bytes replaced); one character for one, so
    offsets into `escaped` are offsets into the text."""
    n_bad = len(_SURROGATE.findall(escaped))
    return (_SURROGATE.sub("\ufffd", escaped) if n_bad else escaped), n_bad


def split_text(text: str, target_chars: int, markdown: bool = False) -> list[tuple[int, int]]:
    """(start, end) character spans of pieces of `text` of at most about `target_chars`, cut at the
    coarsest boundary that fits: blank lines (Markdown: headings first), then lines, sentences,
    words. Spans are trimmed of surrounding whitespace, in order, and never overlap."""
    splitter = (MarkdownSplitter if markdown else TextSplitter)(target_chars)
    spans = [(start, start + len(piece)) for start, piece in splitter.chunk_indices(text)]
    return _merge_short(spans, max(1, target_chars // 10))


def paragraph_spans(text: str, max_chars: int) -> list[tuple[int, int]]:
    """(start, end) of each paragraph of `text` (the blocks between blank lines, trimmed), in order;
    a paragraph longer than `max_chars` is cut further by `split_text`."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for sep in [*_BLANK_LINES.finditer(text), None]:
        end = sep.start() if sep else len(text)
        block = text[pos:end]
        start, stop = pos + len(block) - len(block.lstrip()), pos + len(block.rstrip())
        if stop - start > max_chars:
            spans += [(start + a, start + b) for a, b in split_text(text[start:stop], max_chars)]
        elif stop > start:
            spans.append((start, stop))
        pos = sep.end() if sep else end
    return spans


def _merge_short(spans: list[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Join pieces shorter than `min_chars` to the piece after them (the last one to the piece
    before): a heading or a short paragraph before a long one comes out alone, and cleaning would
    drop it as too short. A joined piece is at most min_chars longer than the target."""
    merged: list[tuple[int, int]] = []
    start = None  # start of short pieces waiting for the next one
    for s, e in spans:
        s = s if start is None else start
        start = s if e - s < min_chars else None
        if start is None:
            merged.append((s, e))
    if start is not None:  # short pieces at the end
        if merged:
            merged[-1] = (merged[-1][0], spans[-1][1])
        else:
            merged.append((start, spans[-1][1]))
    return merged


def _read_python_source(path: Path) -> tuple[str, int]:
    raw = path.read_bytes()
    try:
        # Honour PEP 263 coding cookies: a few stdlib test modules are latin-1 on purpose.
        encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
    except SyntaxError:
        encoding = "utf-8"  # deliberately broken cookies (test/bad_coding*.py)
    encoding = "utf-8" if encoding == "utf-8-sig" else encoding
    return decode_counting(raw, encoding)


def iter_stdlib_documents(parts: Iterable[str] = STDLIB_PARTS) -> Iterator[Document]:
    """The standard library of the running interpreter, in a stable (sorted) order."""
    parts = set(parts)
    unknown = parts - set(STDLIB_PARTS)
    if unknown:
        raise ValueError(f"stdlib_parts: unknown part(s) {sorted(unknown)}; choose from {STDLIB_PARTS}")
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts or not path.is_file():
            continue
        in_tests = bool({"test", "tests"} & set(rel.parts[:-1]))
        if path.suffix == ".py":
            source, part = ("stdlib-test", "tests") if in_tests else ("stdlib-module", "modules")
        elif path.suffix == ".txt":
            # .txt beside the tests is test data (several deliberately not UTF-8); elsewhere docs.
            source, part = ("stdlib-test", "tests") if in_tests else ("stdlib-doc", "docs")
        else:
            continue
        if part not in parts:
            continue
        if path.suffix == ".py":
            text, bad = _read_python_source(path)
        else:
            text, bad = decode_counting(path.read_bytes())
        yield Document(f"stdlib/{rel.as_posix()}", source, str(path), text, path.stat().st_size, bad)
    if "docs" in parts:
        from pydoc_data.topics import topics  # the text behind help('TOPIC'), shipped with Python

        for name in sorted(topics):
            text = topics[name]
            yield Document(f"stdlib-doc/pydoc_topics/{name}", "stdlib-doc", "pydoc_data.topics",
                           text, len(text.encode()), 0)


def parse_json_object(path: Path, lineno: int, line: str) -> dict:
    """One JSONL line that must hold a JSON object; errors name the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(record, dict):
        raise CorpusFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_lines(path: Path) -> Iterator[tuple[str, tuple[int, int, int, dict]]]:
    """("file:line", (line number, raw bytes, bytes replaced, record)) per non-blank line. Malformed
    JSON raises here: it is never a dropped record."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            decoded, bad = decode_counting(line)
            yield f"{path}:{lineno}", (lineno, len(line), bad, parse_json_object(path, lineno, decoded))


def _read_jsonl(path: Path, doc_prefix: str, text_field: str, bad: BadRecords) -> Iterator[Document]:
    def document(line: tuple[int, int, int, dict], where: str) -> Document:
        lineno, n_bytes, invalid, record = line
        if record.get(text_field) is None:
            raise BadRecord("missing_field", where, f"missing text field {text_field!r} (keys: {sorted(record)[:10]})")
        text = record[text_field]
        if not isinstance(text, str):
            raise BadRecord("wrong_type", where, f"field {text_field!r} must be a string, got {type(text).__name__}")
        # An optional "path" (as code datasets carry) names the document: `.py` ones then yield
        # instruction pairs like the stdlib's modules do.
        name = record.get("path")
        if name is not None and not isinstance(name, str):
            raise BadRecord("wrong_type", where, f"field 'path' must be a string, got {type(name).__name__}")
        suffix = f":{name}" if name else ""
        return Document(f"{doc_prefix}#L{lineno}{suffix}", "user", str(path), text, n_bytes, invalid)

    return read_records(_jsonl_lines(path), document, bad)


def _read_parquet(path: Path, doc_prefix: str, column: str, bad: BadRecords) -> Iterator[Document]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusFormatError(f"{path}: not a readable Parquet file: {e}") from e
    if column not in table.column_names:
        raise CorpusFormatError(f"{path}: missing text column {column!r} (columns: {table.column_names})")
    col = table.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise CorpusFormatError(f"{path}: column {column!r} must be a string column, got {col.type}")

    def document(row_text: tuple[int, str | None], where: str) -> Document:
        row, text = row_text
        if text is None:
            raise BadRecord("missing_field", where, f"column {column!r} is null")
        return Document(f"{doc_prefix}#R{row}", "user", str(path), text, len(text.encode()), 0)

    return read_records(((f"{path}: row {row}", (row, text)) for row, text in enumerate(col.to_pylist())),
                        document, bad)


def _read_text_file(path: Path, doc_prefix: str, max_chars: int, target_chars: int) -> list[Document]:
    """One document, or several `<doc_prefix>#chars=<start>-<end>` when longer than `max_chars`
    (0 = never split). Each piece counts its own raw bytes and replaced bytes."""
    raw = path.read_bytes()
    escaped = raw.decode("utf-8", errors="surrogateescape")
    text, bad = _replace_escaped(escaped)
    if not max_chars or len(text) <= max_chars:
        return [Document(doc_prefix, "user", str(path), text, len(raw), bad)]
    pieces = []
    for start, end in split_text(text, target_chars, markdown=path.suffix == ".md"):
        piece_raw = escaped[start:end]
        pieces.append(Document(f"{doc_prefix}#chars={start}-{end}", "user", str(path), text[start:end],
                               len(piece_raw.encode("utf-8", "surrogateescape")), _replace_escaped(piece_raw)[1]))
    return pieces


def read_user_file(path: Path, doc_prefix: str, jsonl_text_field: str = "text",
                   parquet_text_column: str = "text", max_document_chars: int = MAX_DOCUMENT_CHARS,
                   split_target_chars: int = SPLIT_TARGET_CHARS, max_bad_share: float = MAX_BAD_RECORD_SHARE,
                   bad: BadRecords | None = None) -> list[Document]:
    """The documents of one user file; doc ids start with `doc_prefix` (e.g. `raw/<relative path>`).
    A .txt/.md file is one document (several when longer than `max_document_chars`); .jsonl and
    .parquet hold one per line / row. Unusable lines or rows are dropped and counted into `bad`;
    raises TooManyBadRecords when they are more than `max_bad_share` of the file."""
    if path.suffix in TEXT_SUFFIXES:
        return _read_text_file(path, doc_prefix, max_document_chars, split_target_chars)
    if path.suffix not in (".jsonl", ".parquet"):
        raise CorpusFormatError(f"{path}: unsupported file type {path.suffix!r}; use one of {USER_SUFFIXES}")
    mine = BadRecords()  # this file's own tally: the share is judged per file
    docs = list(_read_jsonl(path, doc_prefix, jsonl_text_field, mine) if path.suffix == ".jsonl"
                else _read_parquet(path, doc_prefix, parquet_text_column, mine))
    mine.check(max_bad_share, str(path))
    if bad is not None:
        bad.add(mine)
    return docs


def user_files(sources: CorpusSources, raw_dir: Path) -> list[Path]:
    """Every selected user file under `raw_dir`, sorted by path."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return []
    return sorted({p for g in sources.user_globs for p in raw_dir.glob(g) if p.is_file()})


def _take_evenly(docs: list[Document], n: int) -> list[Document]:
    """n documents spread evenly over the sorted list (every part of the library is sampled)."""
    if n <= 0 or n >= len(docs):
        return docs
    return [docs[i * len(docs) // n] for i in range(n)]


def collect_documents(sources: CorpusSources, raw_dir: Path) -> tuple[list[Document], CorpusStats]:
    docs: list[Document] = []
    stats = CorpusStats()
    if sources.include_stdlib:
        stdlib = list(iter_stdlib_documents(sources.stdlib_parts))
        docs.extend(_take_evenly(stdlib, sources.stdlib_max_documents))
    for path in user_files(sources, raw_dir):
        file_docs = read_user_file(path, f"raw/{path.relative_to(raw_dir).as_posix()}", sources.jsonl_text_field,
                                   sources.parquet_text_column, sources.max_document_chars,
                                   sources.split_target_chars, sources.max_bad_record_share, stats.bad)
        stats.files_read += 1
        stats.files_split += path.suffix in TEXT_SUFFIXES and len(file_docs) > 1
        docs.extend(file_docs)
    for d in docs:
        stats.documents += 1
        stats.bytes += d.n_bytes
        stats.invalid_utf8_bytes += d.invalid_utf8
        stats.documents_with_invalid_utf8 += d.invalid_utf8 > 0
        stats.by_source[d.source] += 1
    return docs, stats


def corpus_file(artifact_dir: Path) -> Path:
    """The one Parquet file of raw_corpus and clean_corpus, read and written by the two below."""
    return Path(artifact_dir) / "corpus.parquet"


def write_documents(docs: list[Document], path: Path, row_group_size: int = 1024) -> None:
    """Parquet with fixed settings (zstd, fixed row groups) so identical input gives identical bytes
    and therefore an identical DVC hash."""
    columns = {name: [getattr(d, name) for d in docs] for name in SCHEMA.names}
    table = pa.table(columns, schema=SCHEMA)
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)


def read_documents(path: Path) -> list[Document]:
    table = pq.read_table(path, columns=SCHEMA.names)
    return [Document(**row) for row in table.to_pylist()]
