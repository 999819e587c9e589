r"""Deduplicated shards: exact and near-duplicate removal, a leak-free train/validation split, and
Parquet shards of a target size.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.data.corpus import Document
    >>> from llm_assets.lib.data.dedup import (SIGNATURES, DedupParams, deduplicate, read_duplicates, read_manifest,
    ...                                        read_params, read_signatures, read_split, write_shards)
    >>> text = " ".join(f"word{i}" for i in range(200))
    >>> texts = {"a": text, "b": text, "c": text.replace("word100", "changed"), "d": "other " * 50}
    >>> docs = [Document(k, "user", k, t, len(t)) for k, t in texts.items()]
    >>> result = deduplicate(docs, DedupParams(validation_fraction=0.5))
    >>> [d.doc_id for d in result.kept], result.cluster_size, result.split
    (['a', 'd'], {'a': 3, 'd': 1}, {'a': 'train', 'd': 'validation'})
    >>> [(d.doc_id, d.kept_doc_id, d.kind) for d in result.duplicates]
    [('b', 'a', 'exact'), ('c', 'a', 'near')]
    >>> out_dir = Path(tempfile.mkdtemp())
    >>> manifest = write_shards(result, out_dir, target_mb=8.0, params=DedupParams(validation_fraction=0.5))
    >>> sorted(p.name for p in out_dir.iterdir())
    ['duplicates.parquet', 'manifest.json', 'signatures.parquet', 'train-00000.parquet', 'validation-00000.parquet']
    >>> read_split(out_dir, "train")["doc_id"].to_pylist(), read_duplicates(out_dir).num_rows
    (['a'], 2)
    >>> read_manifest(out_dir)["splits"]["validation"]["documents"], read_params(out_dir).validation_fraction
    (1, 0.5)
    >>> read_signatures(out_dir / SIGNATURES, DedupParams()).doc_ids    # so later batches hash only themselves
    ['a', 'd']

1. Exact duplicates: identical normalized text (sha256); the smallest doc_id is kept.
2. Near duplicates among the exact-unique documents: MinHash signatures (`minhash.signatures`) fed to
   datasketch's LSH index (`near_dup.near_duplicate_clusters`); pairs whose estimated Jaccard
   similarity of word 5-gram shingles reaches the threshold are merged into clusters (union-find).
   Each cluster keeps its smallest doc_id (the documents are sorted by doc_id first).
   The kept documents' signatures and text hashes go beside the shards (`signatures.parquet`,
   `write_signatures` / `read_signatures`), so an incoming batch is compared with the corpus without
   hashing the corpus again.
3. Split: a document goes to validation when a hash of its cluster id (the kept doc_id) falls under
   the validation fraction. Only one member per cluster survives, and the decision depends on the
   cluster, not on the member, so duplicates can never straddle train and validation.

The split never leaves a side empty when `validation_fraction` > 0; it goes to a finer grain when
the corpus is too small for the hash rule, and says which (`split_grain`) and why (`split_reason`):
  cluster     the rule above (any corpus of a few dozen documents or more);
  document    the hash rule left a side empty: the round(fraction x n) kept documents (at least 1,
              at most n - 1) with the lowest hashes go to validation. Each still stands for its
              whole cluster, so duplicates stay together;
  paragraph   one document is left: its paragraphs become the documents, `<doc_id>#chars=<start>-<end>`
              (one longer than validation_fraction of the text is cut further at lines, sentences,
              words), deduplicated like documents so a repeated paragraph stays on one side; the
              shortest tail of them holding validation_fraction of the text goes to validation (a
              held-out end, as nanoGPT holds out the end of Shakespeare).
A document that cannot be cut into two distinct paragraphs or pieces raises `TooFewDocumentsError`,
which says how many documents to add.

    >>> one = " ".join(f"word{i}" for i in range(80)) + "\n\n" + " ".join(f"term{i}" for i in range(80))
    >>> result = deduplicate([Document("book", "user", "book", one, len(one))], DedupParams(validation_fraction=0.5))
    >>> result.split_grain, result.split
    ('paragraph', {'book#chars=0-549': 'train', 'book#chars=551-1100': 'validation'})
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.data.corpus import Document, paragraph_spans
from llm_assets.lib.data.minhash import signatures
from llm_assets.lib.data.near_dup import near_duplicate_clusters

SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("cluster_size", pa.int32()),  # documents this one stands for (1 = it had no duplicates)
    ]
)
DUPLICATE_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),  # the removed document
        ("kept_doc_id", pa.string()),  # the cluster member that was kept
        ("kind", pa.string()),  # "exact" or "near"
        ("jaccard", pa.float64()),  # estimated Jaccard with the kept document (1.0 for exact)
    ]
)
MANIFEST, DUPLICATES, SIGNATURES = "manifest.json", "duplicates.parquet", "signatures.parquet"
SPLIT_GRAINS = ("cluster", "document", "paragraph")  # coarsest first; see the module docstring


class TooFewDocumentsError(ValueError):
    """The corpus cannot be split into train and validation; the message says how many documents to add."""


class DedupParams(Settings):
    """Near-duplicate detection and the split; the launchpad of `deduped_shards`, kept in the shards'
    manifest so later batches dedup against them alike."""

    model_config = ConfigDict(frozen=True)

    threshold: float = Field(0.8, description="Estimated Jaccard similarity of word shingles at which two documents "
                                              "are near duplicates.")
    num_perm: int = Field(128, description="MinHash signature length (a power of two).")
    shingle_size: int = Field(5, description="Words per shingle.")
    seed: int = Field(1, description="Seed of the MinHash hash functions.")
    validation_fraction: float = Field(0.1, description="Share of duplicate clusters assigned to the validation split.")


@dataclass(frozen=True)
class Duplicate:
    doc_id: str
    kept_doc_id: str
    kind: str
    jaccard: float


@dataclass(frozen=True)
class Signatures:
    """What the index of kept documents needs, without their text."""

    doc_ids: list[str]
    sha256: list[bytes]  # of each text's UTF-8: the exact-duplicate key
    values: np.ndarray  # uint64 (docs, num_perm) MinHash signatures (`minhash.signatures`)


@dataclass
class DedupResult:
    kept: list[Document]
    cluster_size: dict[str, int]  # kept doc_id -> members it stands for
    duplicates: list[Duplicate]
    split: dict[str, str]  # kept doc_id -> "train" | "validation"
    documents_in: int
    split_grain: str = "cluster"  # one of SPLIT_GRAINS
    split_reason: str = ""  # why a finer grain than "cluster" was needed
    signatures: Signatures | None = None  # of `kept`, in its order, made with `params`
    params: DedupParams | None = None

    @property
    def exact_duplicates(self) -> int:
        return sum(d.kind == "exact" for d in self.duplicates)

    @property
    def near_duplicates(self) -> int:
        return sum(d.kind == "near" for d in self.duplicates)

    @property
    def duplicate_rate(self) -> float:
        return len(self.duplicates) / self.documents_in if self.documents_in else 0.0


def _bucket(cluster_id: str) -> float:
    """A uniform number in [0, 1) from the id: deterministic across machines and Python runs (no
    `hash()` randomization)."""
    return int.from_bytes(hashlib.sha256(cluster_id.encode()).digest()[:8], "big") / 2**64


def split_of(cluster_id: str, validation_fraction: float) -> str:
    """The cluster-grain rule (incoming batches use it too)."""
    return "validation" if _bucket(cluster_id) < validation_fraction else "train"


def deduplicate(docs: list[Document], params: DedupParams) -> DedupResult:
    if not 0.0 < params.threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {params.threshold}")
    if not 0.0 <= params.validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {params.validation_fraction}")
    kept, cluster_size, duplicates, sigs = _remove_duplicates(docs, params)
    result = DedupResult(kept, cluster_size, duplicates, {}, len(docs), signatures=sigs, params=params)
    return _assign_splits(result, params)


def _remove_duplicates(docs: list[Document], params: DedupParams, ordered: bool = False
                       ) -> tuple[list[Document], dict[str, int], list[Duplicate], Signatures]:
    """(kept documents, kept doc_id -> cluster size, removed duplicates, the kept ones' signatures).
    Each cluster keeps its first member in doc_id order, or in the given order when `ordered` (the
    kept ones stay in it)."""
    docs = docs if ordered else sorted(docs, key=lambda d: d.doc_id)
    duplicates: list[Duplicate] = []

    first_by_text: dict[bytes, Document] = {}
    unique: list[Document] = []
    exact_count: dict[str, int] = {}
    for doc in docs:
        key = text_sha256(doc.text)
        if key in first_by_text:
            kept = first_by_text[key]
            duplicates.append(Duplicate(doc.doc_id, kept.doc_id, "exact", 1.0))
            exact_count[kept.doc_id] += 1
        else:
            first_by_text[key] = doc
            unique.append(doc)
            exact_count[doc.doc_id] = 1
    shas = list(first_by_text)  # in the order of `unique`

    sigs = signatures([d.text for d in unique], num_perm=params.num_perm, k=params.shingle_size, seed=params.seed)
    removed: set[int] = set()
    cluster_size = dict(exact_count)
    for cluster in near_duplicate_clusters(sigs, threshold=params.threshold):
        rep = unique[cluster.members[0]]
        for idx, jac in zip(cluster.members[1:], cluster.jaccard[1:]):
            removed.add(idx)
            member = unique[idx]
            duplicates.append(Duplicate(member.doc_id, rep.doc_id, "near", float(jac)))
            # exact copies of a near duplicate now point at the cluster's kept document too
            cluster_size[rep.doc_id] += cluster_size.pop(member.doc_id)
    near_of = {d.doc_id: d.kept_doc_id for d in duplicates if d.kind == "near"}
    duplicates = [
        Duplicate(d.doc_id, near_of[d.kept_doc_id], "exact", d.jaccard) if d.kept_doc_id in near_of else d
        for d in duplicates
    ]
    keep = [i for i in range(len(unique)) if i not in removed]
    kept_sigs = Signatures([unique[i].doc_id for i in keep], [shas[i] for i in keep], sigs[keep])
    return [unique[i] for i in keep], cluster_size, duplicates, kept_sigs


def _assign_splits(result: DedupResult, params: DedupParams) -> DedupResult:
    """`result` with its split, at the coarsest grain that fills both sides (validation stays empty
    only when validation_fraction is 0: the user asked for none)."""
    fraction = params.validation_fraction
    split = {d.doc_id: split_of(d.doc_id, fraction) for d in result.kept}
    if fraction == 0 or len(set(split.values())) == 2:
        return replace(result, split=split)
    n = len(result.kept)
    if n >= 2:
        empty = "validation" if "train" in split.values() else "train"
        n_val = _validation_count(n, fraction)
        ranked = sorted(result.kept, key=lambda d: _bucket(d.doc_id))
        split = {d.doc_id: "validation" if i < n_val else "train" for i, d in enumerate(ranked)}
        reason = (f"the hash rule left {empty} empty with {n} documents after deduplication at validation_fraction "
                  f"{fraction}: the {n_val} with the lowest hashes went to validation")
        return replace(result, split=split, split_grain="document", split_reason=reason)
    if n == 0:
        raise TooFewDocumentsError("a train/validation split needs at least 2 documents after deduplication; "
                                   "there are none: add at least 2 documents")
    return _split_lone_document(result, params)


def _validation_count(n: int, fraction: float) -> int:
    """round(fraction x n), but at least 1 and at most n - 1: both sides non-empty."""
    return min(max(round(fraction * n), 1), n - 1)


def _split_lone_document(result: DedupResult, params: DedupParams) -> DedupResult:
    """The paragraph grain: the only document left, as its paragraphs, deduplicated like documents,
    the end of the text held out."""
    doc, fraction = result.kept[0], params.validation_fraction
    sep = "&" if "#" in doc.doc_id else "#"  # a piece of a split file or a JSONL line: one fragment
    pieces = [replace(doc, doc_id=f"{doc.doc_id}{sep}chars={s}-{e}", text=doc.text[s:e],
                      n_bytes=len(doc.text[s:e].encode()))
              for s, e in paragraph_spans(doc.text, max(1, math.ceil(len(doc.text) * fraction)))]
    # in text order: a repeated paragraph is kept where it first appears
    kept, cluster_size, duplicates, sigs = _remove_duplicates(pieces, params, ordered=True)
    if len(kept) < 2:
        raise TooFewDocumentsError(
            f"a train/validation split needs at least 2 documents after deduplication; there is 1 ({doc.doc_id}, "
            f"{len(doc.text)} characters), and cut at paragraphs, lines, sentences and words it gives "
            f"{len(kept)} distinct piece(s): add at least 1 more document")
    n_val = _tail_count([len(p.text) for p in kept], fraction)
    split = {p.doc_id: "validation" if i >= len(kept) - n_val else "train" for i, p in enumerate(kept)}
    reason = (f"one document was left after deduplication ({doc.doc_id}): cut into {len(pieces)} paragraphs "
              f"or pieces, {len(kept)} distinct, the last {n_val} held out for validation")
    # documents_in counts the lone document as its pieces, so duplicate_rate stays a share of what was deduplicated
    return DedupResult(kept, cluster_size, result.duplicates + duplicates, split,
                       result.documents_in - 1 + len(pieces), "paragraph", reason, sigs, params)


def _tail_count(sizes: list[int], fraction: float) -> int:
    """How many of the last pieces hold `fraction` of the characters (at least 1, at most all but one)."""
    total, tail = sum(sizes), 0
    for k, size in enumerate(reversed(sizes[1:]), start=1):
        tail += size
        if tail >= fraction * total:
            return k
    return len(sizes) - 1


def write_shards(result: DedupResult, out_dir: Path, target_mb: float, params: DedupParams | None = None) -> dict:
    """`train-00000.parquet`, ..., `validation-00000.parquet`, ..., `duplicates.parquet` and
    `manifest.json` in `out_dir` (with `params`, so later batches dedup against the shards alike). A shard is closed once its UTF-8 text reaches `target_mb` MB, so
    shards are about that size uncompressed (Parquet zstd makes them smaller on disk)."""
    if target_mb <= 0:
        raise ValueError(f"shard target size must be positive, got {target_mb} MB")
    target = int(target_mb * 1_000_000)
    manifest: dict = {"shards": [], "splits": {}, "split": {"grain": result.split_grain, "reason": result.split_reason}}
    if params is not None:
        manifest["params"] = params.model_dump()
    for split_name in ("train", "validation"):
        docs = [d for d in result.kept if result.split[d.doc_id] == split_name]
        batches: list[list[Document]] = [[]]
        size = 0
        for doc in docs:
            if batches[-1] and size >= target:
                batches.append([])
                size = 0
            batches[-1].append(doc)
            size += len(doc.text.encode())
        if not batches[-1]:
            batches.pop()
        for i, batch in enumerate(batches):
            name = f"{split_name}-{i:05d}.parquet"
            table = pa.table(
                {
                    "doc_id": [d.doc_id for d in batch],
                    "source": [d.source for d in batch],
                    "text": [d.text for d in batch],
                    "cluster_size": [result.cluster_size[d.doc_id] for d in batch],
                },
                schema=SHARD_SCHEMA,
            )
            pq.write_table(table, out_dir / name, compression="zstd")
            manifest["shards"].append(
                {"file": name, "split": split_name, "documents": len(batch),
                 "text_bytes": sum(len(d.text.encode()) for d in batch),
                 "file_bytes": (out_dir / name).stat().st_size})
        manifest["splits"][split_name] = {
            "documents": len(docs),
            "text_bytes": sum(len(d.text.encode()) for d in docs),
            "shards": len(batches),
        }
    dup_table = pa.table(
        {name: [getattr(d, name) for d in result.duplicates] for name in DUPLICATE_SCHEMA.names},
        schema=DUPLICATE_SCHEMA,
    )
    pq.write_table(dup_table, out_dir / DUPLICATES, compression="zstd")
    if result.signatures is not None:
        write_signatures(out_dir / SIGNATURES, result.signatures, result.params)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def text_sha256(text: str) -> bytes:
    """The exact-duplicate key of a text (32 bytes)."""
    return hashlib.sha256(text.encode()).digest()


def _minhash_params(params: DedupParams) -> dict:
    """What a signature depends on: signatures made with other values cannot be compared."""
    return {"num_perm": params.num_perm, "shingle_size": params.shingle_size, "seed": params.seed}


def write_signatures(path: Path, sigs: Signatures, params: DedupParams) -> None:
    """`sigs` as Parquet (doc_id, sha256, signature) with the MinHash parameters in its schema
    metadata, written whole or not at all (a temporary file beside it, then renamed)."""
    path = Path(path)
    num_perm = params.num_perm
    if sigs.values.shape != (len(sigs.doc_ids), num_perm) or len(sigs.sha256) != len(sigs.doc_ids):
        raise ValueError(f"{len(sigs.doc_ids)} doc_ids, {len(sigs.sha256)} sha256 and signatures of shape "
                         f"{sigs.values.shape}: expected ({len(sigs.doc_ids)}, {num_perm})")
    flat = pa.array(np.ascontiguousarray(sigs.values, dtype=np.uint64).reshape(-1), type=pa.uint64())
    table = pa.table({"doc_id": pa.array(sigs.doc_ids, pa.string()),
                      "sha256": pa.array(sigs.sha256, pa.binary(32)),
                      "signature": pa.FixedSizeListArray.from_arrays(flat, num_perm)})
    table = table.replace_schema_metadata({"minhash": json.dumps(_minhash_params(params), sort_keys=True)})
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_signatures(path: Path, params: DedupParams) -> Signatures:
    """What `write_signatures` wrote; fails when they were made with other MinHash parameters."""
    table = pq.read_table(path)
    recorded = json.loads((table.schema.metadata or {}).get(b"minhash", b"null"))
    if recorded != _minhash_params(params):
        raise ValueError(f"{path}: signatures made with {recorded}, not {_minhash_params(params)}; "
                         f"materialize the asset that wrote them again")
    values = table.column("signature").combine_chunks().flatten().to_numpy()
    return Signatures(table.column("doc_id").to_pylist(), table.column("sha256").to_pylist(),
                      values.reshape(-1, params.num_perm).astype(np.uint64, copy=False))


def read_manifest(shard_dir: Path) -> dict:
    """manifest.json: shards, per-split counts and (when recorded) the dedup parameters."""
    return json.loads((Path(shard_dir) / MANIFEST).read_text())


def read_params(shard_dir: Path) -> DedupParams:
    """The parameters the shards were deduplicated with (defaults for shards written before they
    were recorded)."""
    return DedupParams(**read_manifest(shard_dir).get("params", {}))


def read_duplicates(shard_dir: Path) -> pa.Table:
    """The removed documents (DUPLICATE_SCHEMA): which kept document each duplicates, and how."""
    return pq.read_table(Path(shard_dir) / DUPLICATES)


def shard_files(shard_dir: Path, split: str) -> list[Path]:
    """The shard files of one split, in order ([] when the split has none)."""
    return sorted(Path(shard_dir).glob(f"{split}-*.parquet"))


def read_split(shard_dir: Path, split: str) -> pa.Table:
    """All shards of one split as one table (the contract later stages read)."""
    files = shard_files(shard_dir, split)
    if not files:
        raise FileNotFoundError(f"{shard_dir}: no {split} shards ({split}-*.parquet)")
    return pa.concat_tables(pq.read_table(f) for f in files)
