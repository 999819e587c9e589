r"""Incoming batches: files dropped into `data/incoming/`, each cleaned and deduplicated against the
corpus that already exists, then kept as one batch the post-training datasets read beside the shards.

    >>> import json, tempfile, time
    >>> from pathlib import Path
    >>> from llm_assets.lib.common.atomic import atomic_dir
    >>> from llm_assets.lib.data.clean import CleanRules
    >>> from llm_assets.lib.data.dedup import DedupParams
    >>> from llm_assets.lib.data.ingest import (CorpusIndex, batch_key, ingest, read_batch,
    ...                                         read_batch_file, read_batches, scan, write_batch)
    >>> incoming, lake = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> known = "The corpus already holds this sentence about parsing configuration files."
    >>> rows = [known, "A new document about scheduling jobs on a cluster of machines."]
    >>> _ = (incoming / "batch.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    >>> _ = (incoming / "copying.jsonl.tmp").write_text("")    # a copy in progress: never a batch
    >>> ready, settling = scan(incoming, seen={}, settle_s=10)     # just written: still settling
    >>> ready, [p.name for p in settling]
    ([], ['batch.jsonl'])
    >>> (path,), _ = scan(incoming, seen={}, settle_s=10, now=time.time() + 60)
    >>> key = batch_key(path)                  # file name + content hash: a partition key
    >>> index = CorpusIndex(DedupParams())
    >>> index.add(["stdlib/config.py"], [known])              # what the corpus already kept
    >>> result = ingest(read_batch_file(path, key), index, CleanRules(min_chars=20), DedupParams())
    >>> [d.text[:14] for d in result.kept], [dup[1:3] for dup in result.duplicates]
    (['A new document'], [('stdlib/config.py', 'exact')])
    >>> with atomic_dir(lake / key) as tmp:      # as the incoming_batch asset writes it
    ...     write_batch(result, tmp, {"file": path.name})
    >>> info, table = read_batch(lake / key)          # one batch: batch.json + documents
    >>> info, table.column_names, read_batches(lake).num_rows
    ({'file': 'batch.jsonl'}, ['doc_id', 'source', 'text', 'split'], 1)

A batch directory holds `documents.parquet` (kept documents with their split),
`duplicates.parquet` (what was dropped, and why), `signatures.parquet` (the kept documents' MinHash
signatures and text hashes, `dedup.write_signatures`) and `batch.json` (written last: a directory
without it is no batch); `write_batch` writes it and `read_batch` / `read_batches` read it.

The corpus a batch is compared with is the shards' and the earlier batches' persisted signatures
(`known_signatures`): only the batch itself is hashed. The index of them (`CorpusIndex`) is in
memory by default; `lsh_storage` = "redis://host:port/db" (`IndexSettings`) keeps one index in
Redis that every worker ingesting batches shares: batches ingested at the same time by different
processes deduplicate against each other (they take turns under a Redis lock while matching).

A batch is identified by its file's name and content (`batch_key`): the same file dropped twice is
one batch, a changed file is a new one. A file counts as ready once it has not changed for
`settle_s` seconds, so a copy still in progress is never read half-way; writers that can should
write `name.tmp` (ignored) and rename. Only regular files are read: symbolic and hard links are
skipped and named (`skipped_links`), so nothing outside the project is ingested through them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from pydantic import Field
from redis.connection import parse_url

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.data import clean
from llm_assets.lib.data.corpus import USER_SUFFIXES, Document, read_user_file
from llm_assets.lib.data.dedup import (MANIFEST, SIGNATURES, DedupParams, Signatures, read_signatures, read_split,
                                       shard_files, split_of, text_sha256, write_signatures)
from llm_assets.lib.data.minhash import is_empty, signatures
from llm_assets.lib.data.near_dup import default_lsh_threshold, lsh_index, sketch

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
BATCH_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                          ("split", pa.string())])
DUPLICATE_SCHEMA = pa.schema([("doc_id", pa.string()), ("duplicate_of", pa.string()),
                              ("kind", pa.string()), ("jaccard", pa.float64())])
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
BATCH_INFO, DOCUMENTS, DUPLICATES = "batch.json", "documents.parquet", "duplicates.parquet"
LOCK_TIMEOUT_S = 600  # a shared-index lock outlives a crashed holder by at most this; ingests wait as long


def batch_key(path: Path) -> str:
    """`<file name>-<first 8 hex of sha256>`: a valid Dagster partition key, stable per content."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', Path(path).name)[:80]}-{digest}"


def link_reason(path: Path) -> str:
    """Why a drop-zone entry is never read ("" for a plain regular file): a symlink can point
    anywhere (/etc/passwd), and a file with several hard links may be a name for one outside the
    project; either would be ingested and pushed to the DVC remote."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        return f"a hard link ({st.st_nlink} names for one file)"
    return ""


def _batch_entries(incoming_dir: Path) -> list[tuple[Path, str]]:
    """(entry, link_reason) for each drop-zone entry named like a batch, by name; hidden files and
    temp names are left out."""
    if not Path(incoming_dir).is_dir():
        return []
    return sorted((p, link_reason(p)) for p in Path(incoming_dir).iterdir()
                  if not p.name.startswith(".") and p.suffix in USER_SUFFIXES and not p.name.endswith(IGNORED_SUFFIXES))


def candidates(incoming_dir: Path) -> list[Path]:
    """Regular files directly in the drop zone, by name; hidden files, temp names and links
    (`skipped_links`) are left out."""
    return [p for p, reason in _batch_entries(incoming_dir) if not reason and p.is_file()]


def skipped_links(incoming_dir: Path) -> list[str]:
    """'name: reason' for each drop-zone entry named like a batch that is a link (never read)."""
    return [f"{p.name}: {reason}, skipped" for p, reason in _batch_entries(incoming_dir) if reason]


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def scan(incoming_dir: Path, seen: dict[str, list[int]], settle_s: float, now: float | None = None
         ) -> tuple[list[Path], list[Path]]:
    """(ready, still settling) among files whose (size, mtime) differs from `seen[name]`.
    A file modified in the last `settle_s` seconds may still be being written: it waits."""
    now = time.time() if now is None else now
    ready, settling = [], []
    for path in candidates(incoming_dir):
        s = stamp(path)
        if seen.get(path.name) == s:
            continue
        (settling if now - s[1] / 1e9 < settle_s else ready).append(path)
    return ready, settling


def find_batch_file(incoming_dir: Path, key: str) -> Path:
    """The file in the drop zone whose current content has this batch key."""
    name_part = key.rsplit("-", 1)[0]
    for path in candidates(incoming_dir):
        if _UNSAFE.sub("_", path.name)[:80] == name_part and batch_key(path) == key:
            return path
    raise FileNotFoundError(f"batch {key!r}: no file in {incoming_dir} with that name and content "
                            f"(was it changed or removed after it was picked up?)")


def read_batch_file(path: Path, key: str, jsonl_text_field: str = "text",
                    parquet_text_column: str = "text") -> list[Document]:
    """Malformed files raise CorpusFormatError naming the file and line; unusable lines or rows are
    dropped, and a file with more than the default max_bad_record_share of them fails the same way."""
    return list(read_user_file(path, f"incoming/{key}", jsonl_text_field, parquet_text_column))


class IndexSettings(Settings):
    """Where incoming_batch keeps the index of what the corpus and earlier batches kept."""

    lsh_storage: str = Field("", description="'' (default): in memory, loaded per batch from the signatures "
                                             "persisted beside the shards and batches. redis://host:port/db: one "
                                             "index in that Redis (datasketch's Redis storage), shared by every "
                                             "worker that ingests batches, which then take turns under a lock.")


class CorpusIndex:
    """Exact (sha256) and near-duplicate (MinHash LSH, datasketch) lookup of documents already kept.

    In memory by default. With `lsh_storage` = "redis://host:port/db", the LSH buckets (datasketch's
    Redis storage), the signatures and the text hashes live in Redis under `llm_assets:lsh:<corpus_id>:`,
    so every process that opens the index of the same corpus shares it (see `session`)."""

    def __init__(self, params: DedupParams, lsh_storage: str = "", corpus_id: str = "corpus"):
        self.params = params
        self.exact: dict[bytes, str] = {}  # in memory only
        self.sigs: dict[str, np.ndarray] = {}  # in memory only
        self.redis, storage = None, None
        self.name = f"llm_assets:lsh:{corpus_id}:".encode()
        if lsh_storage:
            connection = redis_connection(lsh_storage)
            self.redis = redis.Redis(**connection)
            storage = {"type": "redis", "basename": self.name + b"lsh", "redis": connection}
        self.lsh = lsh_index(default_lsh_threshold(params.threshold), params.num_perm, storage)

    def signatures(self, texts: list[str]) -> np.ndarray:
        p = self.params
        return signatures(texts, num_perm=p.num_perm, k=p.shingle_size, seed=p.seed)

    def add(self, doc_ids: list[str], texts: list[str], sigs: np.ndarray | None = None, batch: str = "") -> None:
        sigs = self.signatures(texts) if sigs is None else sigs
        self.add_signatures(Signatures(list(doc_ids), [text_sha256(t) for t in texts], sigs), batch)

    def add_signatures(self, sigs: Signatures, batch: str = "") -> None:
        """Index documents (the first of a text or doc_id wins); `batch` names the batch that kept
        them, so a later run of that batch can take them out again (shared index)."""
        if self.redis is None:
            fresh = [i for i, d in enumerate(sigs.doc_ids) if d not in self.sigs]
            for i in fresh:
                self.exact.setdefault(sigs.sha256[i], sigs.doc_ids[i])
                self.sigs[sigs.doc_ids[i]] = sigs.values[i]
        else:
            fresh = self._add_shared(sigs, batch)
        rows = [i for i in fresh if not is_empty(sigs.values[i])]
        if len(rows) == 1:  # a session's close reconnects each of datasketch's Redis tables: one goes direct
            self.lsh.insert(sigs.doc_ids[rows[0]], sketch(sigs.values[rows[0]]), check_duplication=False)
            return
        with self.lsh.insertion_session() as session:
            for i in rows:
                session.insert(sigs.doc_ids[i], sketch(sigs.values[i]), check_duplication=False)

    def _add_shared(self, sigs: Signatures, batch: str) -> list[int]:
        """Store text hashes and signatures in Redis; the indices of the doc_ids it did not hold."""
        pipe = self.redis.pipeline(transaction=False)
        for doc_id, sha, sig in zip(sigs.doc_ids, sigs.sha256, sigs.values):
            pipe.hsetnx(self.name + b"sig", doc_id, sig.astype("<u8").tobytes())
            pipe.hsetnx(self.name + b"exact", sha, doc_id)
            if batch:
                pipe.hset(self.name + b"batch:" + batch.encode(), doc_id, sha)
        step = 3 if batch else 2
        return [i for i, new in enumerate(pipe.execute()[::step]) if new]

    def match(self, text: str, sig: np.ndarray) -> tuple[str, str, float] | None:
        """(kept doc_id, "exact" | "near", estimated Jaccard) of the closest duplicate, or None."""
        sha = text_sha256(text)
        hit = self.exact.get(sha) if self.redis is None else _text(self.redis.hget(self.name + b"exact", sha))
        if hit is not None:
            return hit, "exact", 1.0
        if is_empty(sig):
            return None
        found = self.lsh.query(sketch(sig))
        best = max(((float((known == sig).mean()), c) for c, known in zip(found, self._signatures_of(found))),
                   default=None)
        if best is not None and best[0] >= self.params.threshold:
            return best[1], "near", best[0]
        return None

    def _signatures_of(self, doc_ids: list[str]) -> list[np.ndarray]:
        if self.redis is None or not doc_ids:
            return [self.sigs[d] for d in doc_ids]
        return [np.frombuffer(b, dtype="<u8") for b in self.redis.hmget(self.name + b"sig", doc_ids)]

    @contextlib.contextmanager
    def session(self, batch: str = "", load: Callable[[], Iterable[Signatures]] | None = None) -> Iterator[None]:
        """The index, ready to match and add the documents of `batch`. In memory: `load()` (what
        the corpus and earlier batches kept) is added. Shared: the processes take turns (a Redis
        lock, held while matching, not while hashing); the first loads, later ones find it loaded;
        what an earlier run of `batch` added (a failed or repeated run) is taken out, so a batch
        never matches itself."""
        if self.redis is None:
            for sigs in load() if load else ():
                self.add_signatures(sigs)
            yield
            return
        with self.redis.lock(self.name + b"lock", timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_TIMEOUT_S):
            if not self.redis.exists(self.name + b"loaded"):
                for sigs in load() if load else ():
                    self.add_signatures(sigs)
                self.redis.set(self.name + b"loaded", 1)
            self._forget(batch)
            yield

    def _forget(self, batch: str) -> None:
        """Take out what an earlier run of `batch` added to the shared index."""
        key = self.name + b"batch:" + batch.encode()
        for doc_id, sha in self.redis.hgetall(key).items():
            doc_id = doc_id.decode()
            if doc_id in self.lsh:
                self.lsh.remove(doc_id)
            self.redis.hdel(self.name + b"sig", doc_id)
            if _text(self.redis.hget(self.name + b"exact", sha)) == doc_id:
                self.redis.hdel(self.name + b"exact", sha)
        self.redis.delete(key)


def redis_connection(url: str) -> dict:
    """redis://host:port/db as the keyword arguments of `redis.Redis` (datasketch's "redis" config)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"lsh_storage must be '' (in memory) or redis://host:port/db, got {url!r}")
    return parse_url(url)


def corpus_id(shard_dir: Path) -> str:
    """Names the shared index of one version of the shards: new shards start a new index."""
    path = Path(shard_dir) / SIGNATURES
    path = path if path.is_file() else Path(shard_dir) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def known_signatures(shard_dir: Path, lake_dir: Path, params: DedupParams, exclude: str = "") -> Iterator[Signatures]:
    """What the shards and every batch but `exclude` kept, read from their signatures; shards and
    batches written before signatures were persisted are hashed from their text."""
    yield _stored_or_hashed(Path(shard_dir), params, lambda: pa.concat_tables(
        read_split(shard_dir, s) for s in ("train", "validation") if shard_files(shard_dir, s)))
    for batch in batch_dirs(lake_dir):
        if batch.name != exclude:
            yield _stored_or_hashed(batch, params, lambda: pq.read_table(documents_file(batch)))


def _stored_or_hashed(directory: Path, params: DedupParams, documents: Callable[[], pa.Table]) -> Signatures:
    if (directory / SIGNATURES).is_file():
        return read_signatures(directory / SIGNATURES, params)
    table = documents()
    texts = table.column("text").to_pylist()
    return Signatures(table.column("doc_id").to_pylist(), [text_sha256(t) for t in texts],
                      signatures(texts, num_perm=params.num_perm, k=params.shingle_size, seed=params.seed))


@dataclass
class IngestResult:
    kept: list[Document]
    split: dict[str, str]
    duplicates: list[tuple[str, str, str, float]]  # (doc_id, duplicate_of, kind, jaccard)
    clean_report: clean.CleanReport
    documents_in: int
    signatures: Signatures  # of `kept`, in its order
    params: DedupParams


def ingest(docs: list[Document], index: CorpusIndex, rules: clean.CleanRules, params: DedupParams,
           batch: str = "", load: Callable[[], Iterable[Signatures]] | None = None) -> IngestResult:
    """Clean the batch with the corpus's rules, then keep each document only if neither the corpus
    (in `index`, plus what `load` yields; see `CorpusIndex.session`) nor an earlier document of the
    batch is its exact or near duplicate. Only the batch is hashed. The kept documents take the
    corpus's split rule (a hash of the doc id)."""
    cleaned, report = clean.clean_documents(docs, rules)  # nothing left: NoDocumentsLeftError says why
    sigs = index.signatures([d.text for d in cleaned])
    kept, kept_rows, duplicates = [], [], []
    with index.session(batch, load):
        for row, (doc, sig) in enumerate(zip(cleaned, sigs)):
            hit = index.match(doc.text, sig)
            if hit is not None:
                duplicates.append((doc.doc_id, *hit))
                continue
            kept.append(doc)
            kept_rows.append(row)
            index.add([doc.doc_id], [doc.text], sig[None, :], batch)  # later documents dedup against it
    split = {d.doc_id: split_of(d.doc_id, params.validation_fraction) for d in kept}
    kept_sigs = Signatures([d.doc_id for d in kept], [text_sha256(d.text) for d in kept], sigs[kept_rows])
    return IngestResult(kept, split, duplicates, report, len(docs), kept_sigs, params)


def write_batch(result: IngestResult, out_dir: Path, info: dict) -> None:
    out_dir = Path(out_dir)
    kept = result.kept
    table = pa.table({"doc_id": [d.doc_id for d in kept], "source": [d.source for d in kept],
                      "text": [d.text for d in kept], "split": [result.split[d.doc_id] for d in kept]},
                     schema=BATCH_SCHEMA)
    pq.write_table(table, documents_file(out_dir), compression="zstd")
    dups = list(zip(*result.duplicates)) if result.duplicates else [[], [], [], []]
    pq.write_table(pa.table(dict(zip(DUPLICATE_SCHEMA.names, dups)), schema=DUPLICATE_SCHEMA),
                   out_dir / DUPLICATES, compression="zstd")
    write_signatures(out_dir / SIGNATURES, result.signatures, result.params)  # later batches read, not hash, them
    (out_dir / BATCH_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))


def documents_file(batch_dir: Path) -> Path:
    """The kept documents of a batch (its content: the partition's data version hashes it)."""
    return Path(batch_dir) / DOCUMENTS


def is_batch(batch_dir: Path) -> bool:
    """Whether `batch_dir` holds a complete batch (batch.json is written last)."""
    return (Path(batch_dir) / BATCH_INFO).is_file()


def read_batch(batch_dir: Path) -> tuple[dict, pa.Table]:
    """(batch.json, kept documents) of one complete batch."""
    if not is_batch(batch_dir):
        raise FileNotFoundError(f"{batch_dir}: not an ingested batch (no {BATCH_INFO})")
    return json.loads((Path(batch_dir) / BATCH_INFO).read_text()), pq.read_table(documents_file(batch_dir))


def batch_dirs(lake_dir: Path) -> list[Path]:
    """Every complete batch (`<key>/batch.json` is written last, inside an atomic directory whose
    staging name starts with a dot)."""
    root = Path(lake_dir)
    return sorted(p.parent for p in root.glob(f"*/{BATCH_INFO}") if not p.parent.name.startswith(".")) if root.is_dir() else []


def read_batches(lake_dir: Path, split: str | None = None, exclude: str | None = None) -> pa.Table:
    """Kept documents of every ingested batch but `exclude` (optionally one split), by batch key."""
    tables = [pq.read_table(documents_file(d)) for d in batch_dirs(lake_dir) if d.name != exclude]
    table = pa.concat_tables(tables) if tables else BATCH_SCHEMA.empty_table()
    return table.filter(pc.equal(table["split"], split)) if split else table


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()
