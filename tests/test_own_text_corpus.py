"""A corpus that is one 1 MB plain-text file, with French and Chinese paragraphs among English ones,
through raw_corpus -> clean_corpus -> deduped_shards -> tokenizer -> tokenized_shards ->
base_checkpoint with the tiny config: the file becomes documents, the split has a validation side
without leaks, and every character comes back exactly from the shards, the tokenizer and the
packed token streams."""

from __future__ import annotations

import math
import random
import re
import sysconfig
import textwrap
import unicodedata
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import UPSTREAM, materialize, metadata
from llm_assets.lib.data import dedup
from llm_assets.lib.tokenizer.packing import load_tokens

FRENCH = ("élève façade garçon où déjà très hôtel château crème brûlée fenêtre île être ça cœur Noël "
          "naïve forêt été à là mûr goût leçon reçu Ève Œuvre").split()
CHINESE = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
           "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长")


def book_paragraphs(target_bytes: int = 1_050_000, seed: int = 0) -> list[str]:
    """Distinct paragraphs, wrapped like a printed book: English words (from Python's licence)
    with every fifth paragraph French and every seventh Chinese, until `target_bytes` of UTF-8."""
    rng = random.Random(seed)
    licence = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    english = sorted(set(re.findall(r"[a-z]{3,}", licence.lower())))
    paras, size = [], 0
    while size < target_bytes:
        i = len(paras)
        if i % 7 == 3:
            clauses = ["".join(rng.choices(CHINESE, k=rng.randint(6, 14))) for _ in range(rng.randint(8, 16))]
            text = textwrap.fill("，".join(clauses) + "。", 40)
        else:
            words = rng.choices(FRENCH if i % 5 == 1 else english, k=rng.randint(60, 120))
            text = textwrap.fill(f"{i}. " + " ".join(words).capitalize() + ".", 72)
        paras.append(text)
        size += len(text.encode()) + 2
    return paras


@pytest.fixture(scope="module")
def book_run(project_factory, tiny_config):
    project = project_factory("book")
    paras = book_paragraphs()
    text = "\n\n".join(paras) + "\n"
    assert unicodedata.is_normalized("NFC", text)  # what cleaning keeps byte for byte
    (project / "data/raw/book.txt").write_text(text)
    cfg = tiny_config()
    cfg["ops"]["raw_corpus"]["config"] = {"include_stdlib": False}
    cfg["ops"]["base_checkpoint"]["config"].update(max_steps=10, eval_every=5, checkpoint_every=5)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, cfg, [*UPSTREAM, "base_checkpoint"], instance)
    return project, text, paras, instance, result


def shard_texts(project: Path, split: str) -> dict[str, str]:
    table = dedup.read_split(project / "data/lake/deduped_shards", split)
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))


def test_one_big_file_becomes_documents_with_a_leak_free_validation_split(book_run):
    project, text, paras, instance, result = book_run
    assert result.success
    assert len(text.encode()) > 1_000_000
    raw, clean, shards = (metadata(instance, a) for a in ("raw_corpus", "clean_corpus", "deduped_shards"))
    assert raw["user_files"] == raw["user_files_split"] == 1 and raw["documents"] > 100
    assert clean["documents"] == raw["documents"]  # no piece is too long, too short or dropped otherwise
    assert shards["split_grain"] == "cluster" and shards["exact_duplicates"] + shards["near_duplicates"] == 0
    train, validation = shard_texts(project, "train"), shard_texts(project, "validation")
    assert len(validation) >= 10 and len(train) + len(validation) == raw["documents"]
    # every paragraph lies whole in exactly one document, on one side: nothing lost, nothing leaked
    sides = {p: [s for s, docs in (("train", train), ("validation", validation)) for t in docs.values() if p in t]
             for p in paras}
    assert all(len(s) == 1 for s in sides.values())
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["deduped_shards_splits_disjoint"] and checks["tokenizer_roundtrip"]


def test_non_ascii_text_comes_back_exactly_from_shards_tokenizer_and_token_streams(book_run):
    project, text, _, instance, result = book_run
    assert result.success
    docs = {**shard_texts(project, "train"), **shard_texts(project, "validation")}
    for doc_id, doc_text in docs.items():  # cleaning and dedup kept each piece as the file has it
        start, end = map(int, doc_id.removeprefix("raw/book.txt#chars=").split("-"))
        assert text[start:end] == doc_text
    assert any("œ" in t for t in docs.values()) and any("，" in t for t in docs.values())
    tok = AutoTokenizer.from_pretrained(project / "data/lake/base_checkpoint")  # the model's own tokenizer
    for doc_text in docs.values():
        assert tok.decode(tok.encode(doc_text, add_special_tokens=False)) == doc_text
    packed = project / "data/lake/tokenized_shards"
    for split in ("train", "validation"):
        ids = np.asarray(load_tokens(packed, split))
        ends = np.flatnonzero(ids == tok.eos_token_id)
        decoded = [tok.decode(piece) for piece in np.split(ids, ends + 1)[:-1]]
        assert decoded == [t + tok.eos_token for t in shard_texts(project, split).values()]


def test_the_model_trained_on_it_reads_and_writes_chinese_and_french(book_run):
    project, _, _, instance, result = book_run
    assert result.success
    md = metadata(instance, "base_checkpoint")
    assert md["steps"] == 10 and math.isfinite(md["val_loss"]) and md["val_loss"] > 0
    out = project / "data/lake/base_checkpoint"
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    prompt = "déjà vu，中文"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(generated[0, : ids.shape[1]]) == prompt
