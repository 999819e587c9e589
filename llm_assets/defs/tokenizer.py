"""Group `tokenizer`: tokenizer (byte-level BPE, transformers format) -> tokenized_shards (packed ids)."""

import time

import dagster as dg
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.data import dedup
from llm_assets.lib.tokenizer import packing
from llm_assets.lib.tokenizer import tokenizer as bpe
from llm_assets.lib.common.report import markdown_table

SPECIAL_ROLES = ("begin of sequence (bos)", "end of document (eos)", "padding (pad)",
                 "chat: system turn", "chat: user turn", "chat: assistant turn", "chat: end of turn")


class TokenizerConfig(dg.Config):
    vocab_size: int = Field(
        8192, description=f"Vocabulary size, counting the {len(bpe.SPECIAL_TOKENS)} special tokens and "
                          f"{bpe.BYTE_ALPHABET} byte symbols (must exceed {len(bpe.SPECIAL_TOKENS) + bpe.BYTE_ALPHABET}).")
    min_frequency: int = Field(2, description="A pair of symbols must occur this often in the training text to become a merge.")
    max_train_mb: float = Field(
        0.0, ge=0, description="Train on at most this many MB of the train split, documents spread evenly "
                               "over it (0 = all). Bounds training time: 28 MB takes ~5-10 s on 2 cores at 8192.")


@dg.asset(
    group_name="tokenizer",
    kinds={"huggingface", "dvc"},
    deps=["deduped_shards"],
    check_specs=[dg.AssetCheckSpec(
        "tokenizer_roundtrip", asset="tokenizer", blocking=True,
        description="decode(encode(x)) == x, byte for byte, on every validation document and on fixed "
                    "non-ASCII samples (accents, CJK, emoji, mixed newlines and tabs).")],
)
def tokenizer(context: dg.AssetExecutionContext, config: TokenizerConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Byte-level BPE tokenizer trained on the train split (Hugging Face `tokenizers`), saved with
    `save_pretrained` so `AutoTokenizer.from_pretrained(dir)` loads it; special tokens
    <|bos|> <|eos|> <|pad|> and chat markers <|system|> <|user|> <|assistant|> <|end|>, chat template."""
    shards = lake.artifact_dir("deduped_shards")
    train = bpe.sample_texts(dedup.read_split(shards, "train").column("text").to_pylist(),
                             int(config.max_train_mb * 1e6))
    validation = dedup.read_split(shards, "validation")
    start = time.perf_counter()
    tok = bpe.train_tokenizer(train, config.vocab_size, config.min_frequency)
    seconds = time.perf_counter() - start
    if len(tok) < config.vocab_size:
        context.log.warning(f"vocabulary stopped at {len(tok)} of {config.vocab_size}: no more pairs reach "
                            f"min_frequency={config.min_frequency} in {len(train)} documents")
    out = lake.artifact_dir("tokenizer")
    with lake.write("tokenizer") as tmp:
        tok.save_pretrained(tmp)
    version = lake.record("tokenizer")

    saved = bpe.load_tokenizer(out)  # metadata and the gate describe the artifact, not the object in memory
    texts = validation.column("text").to_pylist()
    line = _example_line(texts)
    specials = [(t, saved.convert_tokens_to_ids(t), role) for t, role in zip(bpe.SPECIAL_TOKENS, SPECIAL_ROLES)]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "vocab_size": len(saved),
            "bytes_per_token": bpe.bytes_per_token(saved, texts),
            "training_seconds": seconds,
            "train_documents": len(train),
            "train_text_bytes": sum(len(t.encode()) for t in train),
            "special_tokens": dg.MetadataValue.md(markdown_table(["token", "id", "role"], specials)),
            "example": dg.MetadataValue.md(_example_markdown(saved, line)),
        },
        data_version=dg.DataVersion(version.md5),
        check_results=[_roundtrip(saved, texts, validation.column("doc_id").to_pylist())],
    )


def _roundtrip(tok, texts: list[str], doc_ids: list[str]) -> dg.AssetCheckResult:
    samples = list(bpe.ROUNDTRIP_SAMPLES)
    failures = bpe.roundtrip_failures(tok, texts + samples)
    names = [doc_ids[i] if i < len(texts) else repr(samples[i - len(texts)]) for i in failures]
    return dg.AssetCheckResult(
        check_name="tokenizer_roundtrip", passed=not failures,
        metadata={"threshold": 0, "observed_failures": len(failures), "documents_checked": len(texts),
                  "samples_checked": len(samples), "failing": ", ".join(names[:10]) or "none"})


def _example_line(texts: list[str]) -> str:
    """A validation line of readable length (the first with 40-100 characters)."""
    lines = (ln for t in texts for ln in t.splitlines() if 40 <= len(ln.strip()) <= 100)
    return next(lines, texts[0][:100] if texts else "")


def _example_markdown(tok, line: str) -> str:
    ids = tok.encode(line, add_special_tokens=False)
    return (f"A validation line ({len(line.encode())} bytes, {len(ids)} tokens):\n\n```\n{line}\n```\n\n"
            f"Tokens (text, ids):\n\n```\n{bpe.token_pieces(tok, line)}\n{ids}\n```")


@dg.asset(group_name="tokenizer", kinds={"numpy", "dvc"}, deps=[tokenizer, "deduped_shards"])
def tokenized_shards(lake: LakeResource) -> dg.MaterializeResult:
    """Token ids of the train and validation shards, packed for pretraining: `<split>.bin` holds every
    document's ids followed by eos, one flat little-endian uint16 array (uint32 past 65,536 ids),
    memory-mappable; `meta.json` has the dtype, special token ids and per-split counts."""
    tok = bpe.load_tokenizer(lake.artifact_dir("tokenizer"))
    out = lake.artifact_dir("tokenized_shards")
    start = time.perf_counter()
    with lake.write("tokenized_shards") as tmp:  # an empty split raises, naming it; nothing replaced
        meta = packing.write_packed(tok, lake.artifact_dir("deduped_shards"), tmp)
    seconds = time.perf_counter() - start
    version = lake.record("tokenized_shards")
    splits = meta["splits"]

    def per_token(s: dict) -> float:  # text bytes per token, the eos separators not counted
        return s["text_bytes"] / max(1, s["tokens"] - s["documents"])

    total = {k: sum(s[k] for s in splits.values()) for k in ("text_bytes", "tokens", "documents")}
    rows = [(name, s["documents"], s["tokens"], s["text_bytes"], per_token(s),
             packing.split_path(out, name).stat().st_size) for name, s in splits.items()]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(out, version),
            "train_tokens": splits["train"]["tokens"],
            "validation_tokens": splits["validation"]["tokens"],
            "train_documents": splits["train"]["documents"],
            "validation_documents": splits["validation"]["documents"],
            "dtype": meta["dtype"],
            "vocab_size": meta["vocab_size"],
            "bytes_per_token": per_token(total),
            "packing_seconds": seconds,
            "splits": dg.MetadataValue.md(markdown_table(
                ["split", "documents", "tokens (with eos)", "text bytes", "bytes/token", "file bytes"], rows)),
        },
        data_version=dg.DataVersion(version.md5),
    )
