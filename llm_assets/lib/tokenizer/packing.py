"""Packed token streams for pretraining: every document of a split, tokenized and concatenated.

    meta = write_packed(tok, shard_dir, out_dir)    # train.bin, validation.bin, meta.json
    ids = load_tokens(out_dir, "train")              # np.memmap, shape (tokens,)

Format of `out_dir`:
- `<split>.bin`: one flat array of token ids, raw little-endian with no header, `uint16` when every
  id fits (vocabulary of at most 65,536 entries) else `uint32`. Each document's ids are followed by
  the eos id: `doc0 <eos> doc1 <eos> ... docN <eos>`; no bos, no padding. Cut windows of any length
  from it (nanoGPT style); eos marks where one document ends and the next begins.
  Read with `np.memmap(path, dtype=meta["dtype"], mode="r")`.
- `meta.json`: `dtype`, `vocab_size` (len of the tokenizer, special tokens included), `eos_token_id`,
  `bos_token_id`, `pad_token_id`, `splits: {split: {tokens, documents, text_bytes}}` (`tokens`
  counts the eos separators too) and `format`, a one-line description of the above.

Document text is data, never control: a literal "<|eos|>" inside a document is tokenized as plain
text, so eos ids in the stream are exactly the document boundaries.

Run on its own (packs existing shards with an existing tokenizer):
    python -m llm_assets.lib.tokenizer.packing data/lake/tokenizer data/lake/deduped_shards /tmp/packed
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from llm_assets.lib.data.dedup import read_split

SPLITS = ("train", "validation")
FORMAT = ("flat little-endian token ids, each document followed by eos_token_id; "
          "np.memmap(<split>.bin, dtype=dtype, mode='r')")
BATCH_CHARS = 4_000_000  # text per encode_batch call: bounds memory, keeps both Rust threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while the largest id (vocab_size - 1) fits in 16 bits, else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _text_only(tok: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the Rust tokenizer that encodes special-token strings in documents as text."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


def _batches(texts: Sequence[str]):
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= BATCH_CHARS:
            yield texts[start:i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:]


def pack_split(tok: PreTrainedTokenizerFast, texts: Sequence[str], path: Path) -> tuple[int, int]:
    """Write `texts` as one packed stream to `path`; returns (tokens including eos, documents)."""
    if tok.eos_token_id is None:
        raise ValueError("pack_split: the tokenizer has no eos token to separate documents")
    backend, dtype = _text_only(tok), token_dtype(len(tok))
    eos = np.array([tok.eos_token_id], dtype=dtype)
    tokens = 0
    with open(path, "wb") as f:
        for batch in _batches(texts):
            # encode_batch_fast skips character offsets: ~3.5x faster than encode_batch here
            encodings = backend.encode_batch_fast(list(batch), add_special_tokens=False)
            parts = [p for e in encodings for p in (np.asarray(e.ids, dtype=dtype), eos)]
            stream = np.concatenate(parts)
            stream.tofile(f)
            tokens += len(stream)
    return tokens, len(texts)


def write_packed(tok: PreTrainedTokenizerFast, shard_dir: Path, out_dir: Path) -> dict:
    """Pack both splits of the deduplicated shards in `shard_dir` into `out_dir`; returns meta."""
    out_dir = Path(out_dir)
    splits = {}
    for split in SPLITS:
        texts = read_split(Path(shard_dir), split).column("text").to_pylist()
        if not texts:
            raise ValueError(f"{shard_dir}: the {split} split has no documents")
        tokens, documents = pack_split(tok, texts, out_dir / f"{split}.bin")
        splits[split] = {"tokens": tokens, "documents": documents,
                         "text_bytes": sum(len(t.encode()) for t in texts)}
    meta = {
        "dtype": token_dtype(len(tok)).name,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "splits": splits,
        "format": FORMAT,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(packed_dir: Path) -> dict:
    path = Path(packed_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a packed token directory)")
    return json.loads(path.read_text())


def load_tokens(packed_dir: Path, split: str) -> np.memmap:
    """The packed ids of one split, memory-mapped read-only, checked against meta.json."""
    meta = read_meta(packed_dir)
    path = Path(packed_dir) / f"{split}.bin"
    if split not in meta["splits"]:
        raise KeyError(f"{Path(packed_dir) / 'meta.json'}: no split {split!r} (has {sorted(meta['splits'])})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta["splits"][split]["tokens"] * dtype.itemsize
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty")
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but meta.json says {meta['splits'][split]['tokens']} "
                         f"{meta['dtype']} tokens ({expected} bytes)")
    return np.memmap(path, dtype=dtype, mode="r")


if __name__ == "__main__":
    import sys
    import time

    from llm_assets.lib.tokenizer.tokenizer import load_tokenizer

    tok_dir, shard_dir, out_dir = map(Path, sys.argv[1:4])
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = write_packed(load_tokenizer(tok_dir), shard_dir, out_dir)
    print(f"packed in {time.perf_counter() - start:.1f} s: {json.dumps(meta['splits'])}")
