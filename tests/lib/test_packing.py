import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm_assets.lib.tokenizer import packing
from llm_assets.lib.data.corpus import Document
from llm_assets.lib.data.dedup import DedupParams, deduplicate, write_shards
from llm_assets.lib.tokenizer.packing import (load_tokens, pack_split, read_meta, split_path, token_dtype,
                                             write_packed, write_streams)
from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "csv.py", "shlex.py", "fnmatch.py", "heapq.py", "string.py", "bisect.py",
           "colorsys.py", "glob.py", "keyword.py", "queue.py", "json/decoder.py", "json/encoder.py"]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [(STDLIB / m).read_text() for m in MODULES]


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs, vocab_size=400)


def split_at_eos(ids: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(ids == eos)
    assert len(ids) and ends[-1] == len(ids) - 1  # the stream ends with eos
    return [ids[start:end].tolist() for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_stream_decodes_back_to_the_documents(tok, docs, tmp_path):
    texts = [*docs, "", "émoji 😀 and a literal <|eos|> stay text", "x"]
    tokens, documents = pack_split(tok, texts, tmp_path / "train.bin")
    ids = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    assert (tokens, documents) == (len(ids), len(texts))
    pieces = split_at_eos(ids, tok.eos_token_id)
    # eos appears only as a separator: the literal "<|eos|>" in a document is encoded as text
    assert len(pieces) == len(texts)
    assert [tok.decode(p) for p in pieces] == texts
    assert pieces[0] == tok.encode(texts[0], add_special_tokens=False)


def test_batches_cover_every_document_once(tok, docs, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "BATCH_CHARS", 10_000)  # several batches, some of one document
    pack_split(tok, docs, tmp_path / "small.bin")
    monkeypatch.setattr(packing, "BATCH_CHARS", 10**9)
    pack_split(tok, docs, tmp_path / "one.bin")
    assert (tmp_path / "small.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()


@pytest.mark.parametrize(("vocab", "dtype"), [(400, "uint16"), (65_535, "uint16"), (65_536, "uint16"),
                                              (65_537, "uint32"), (200_000, "uint32")])
def test_dtype_holds_the_largest_id(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab)).max >= vocab - 1
    assert token_dtype(vocab).byteorder in "<="  # little-endian on disk (native here)


def shard_dir(tmp_path: Path, docs: list[str], validation_fraction: float) -> Path:
    documents = [Document(f"d{i:02d}", "stdlib-module", f"m{i}", text, len(text.encode()))
                 for i, text in enumerate(docs)]
    result = deduplicate(documents, DedupParams(validation_fraction=validation_fraction))
    out = tmp_path / "shards"
    out.mkdir()
    write_shards(result, out, target_mb=0.05)
    return out


def test_write_packed_meta_matches_the_files(tok, docs, tmp_path):
    shards = shard_dir(tmp_path, docs, validation_fraction=0.3)
    out = tmp_path / "packed"
    out.mkdir()
    meta = write_packed(tok, shards, out)
    assert read_meta(out) == json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert (meta["eos_token_id"], meta["bos_token_id"], meta["pad_token_id"]) == (1, 0, 2)
    assert sum(s["documents"] for s in meta["splits"].values()) == len(docs)
    for split in ("train", "validation"):
        ids = load_tokens(out, split)
        counts = meta["splits"][split]
        assert len(ids) == counts["tokens"] == (out / f"{split}.bin").stat().st_size // 2
        assert int((ids == 1).sum()) == counts["documents"] > 0
        assert sum(len(tok.decode(p).encode()) for p in split_at_eos(ids, 1)) == counts["text_bytes"]


def test_load_tokens_errors_name_the_file(tok, docs, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json: missing"):
        load_tokens(tmp_path, "train")
    shards = shard_dir(tmp_path, docs, validation_fraction=0.3)
    out = tmp_path / "packed"
    out.mkdir()
    write_packed(tok, shards, out)
    with pytest.raises(KeyError, match="no split 'test'"):
        load_tokens(out, "test")
    with (out / "train.bin").open("ab") as f:
        f.write(b"\0\0")  # one token more than meta.json says
    with pytest.raises(ValueError, match=r"train.bin: \d+ bytes, but meta.json says \d+ uint16 tokens"):
        load_tokens(out, "train")
    (out / "validation.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="validation.bin: empty"):
        load_tokens(out, "validation")
    (out / "validation.bin").unlink()
    with pytest.raises(FileNotFoundError, match="validation.bin: missing"):
        load_tokens(out, "validation")


def test_a_missing_split_fails_naming_it(tok, docs, tmp_path):
    shards = shard_dir(tmp_path, docs, validation_fraction=0.0)  # nothing goes to validation
    out = tmp_path / "packed"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match="no validation shards"):
        write_packed(tok, shards, out)


@pytest.mark.parametrize("vocab", [400, 70_000])
def test_written_streams_read_back_identically(tmp_path, vocab):
    streams = {"train": [5, 6, 1, 7, 1], "validation": [vocab - 1, 1], "empty": []}
    meta = write_streams(tmp_path, streams, vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    assert read_meta(tmp_path) == meta and meta["dtype"] == token_dtype(vocab).name
    assert meta["splits"]["train"] == {"tokens": 5, "documents": 2}
    for split in ("train", "validation"):
        ids = load_tokens(tmp_path, split)
        assert ids.tolist() == streams[split] and ids.dtype == token_dtype(vocab)
        assert split_path(tmp_path, split).stat().st_size == len(ids) * ids.dtype.itemsize
    with pytest.raises(ValueError, match="empty.bin: empty"):
        load_tokens(tmp_path, "empty")
    with pytest.raises(ValueError, match="outside uint16"):
        write_streams(tmp_path, {"train": [70_000]}, 400, 0, 1, 2)


def test_meta_without_a_promised_key_fails_naming_it(tmp_path):
    write_streams(tmp_path, {"train": [5, 1]}, 400, 0, 1, 2)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "eos_token_id"}))
    with pytest.raises(ValueError, match=r"meta.json: missing \['eos_token_id'\]"):
        load_tokens(tmp_path, "train")
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "dtype": "int64"}))
    with pytest.raises(ValueError, match="dtype must be uint16 or uint32"):
        read_meta(tmp_path)
