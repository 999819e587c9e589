"""A corpus of prose only (20 JSONL documents and 20 Markdown files with headings, no stdlib, no
user files in data/sft or data/preferences) through the whole tiny graph: sft_dataset derives
continuation and section pairs from the text itself, lora_checkpoint trains on them,
preference_dataset ranks lora_checkpoint's own replies against them, aligned_checkpoint trains on
those; every pair stays on its document's side of the split; hard negatives come from the same
document."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from helpers import POST, UPSTREAM, materialize, metadata
from llm_assets.lib.data import dedup

pytestmark = pytest.mark.slow  # the whole graph: 60-90 s on 2 busy cores


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choices(words, k=rng.randint(8, 16))).capitalize() + "."


def paragraph(rng: random.Random, words: list[str]) -> str:
    return " ".join(sentence(rng, words) for _ in range(rng.randint(3, 5)))


def write_prose(raw: Path, seed: int = 0) -> None:
    """20 essays of 6-9 paragraphs as JSONL lines and 20 Markdown notes with a title and sections,
    of words from Python's licence (distinct random sentences: nothing is a near duplicate)."""
    rng = random.Random(seed)
    licence = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    words = sorted(set(re.findall(r"[a-z]{3,}", licence.lower())))
    essays = ["\n\n".join(paragraph(rng, words) for _ in range(rng.randint(6, 9))) for _ in range(20)]
    (raw / "essays.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in essays))
    for i in range(20):
        sections = [f"## Part {k} of note {i}\n\n{paragraph(rng, words)}\n\n{paragraph(rng, words)}" for k in range(3)]
        (raw / f"note_{i}.md").write_text(f"# Note {i}\n\n{paragraph(rng, words)}\n\n" + "\n\n".join(sections) + "\n")


@pytest.fixture(scope="module")
def prose_run(project_factory, tiny_config):
    project = project_factory("prose")
    write_prose(project / "data/raw")
    cfg = tiny_config()
    cfg["ops"]["raw_corpus"]["config"] = {"include_stdlib": False}
    cfg["ops"]["base_checkpoint"]["config"].update(max_steps=10, eval_every=5, checkpoint_every=5)
    # the tiny config made cheaper where time goes: generation, evaluations
    cfg["ops"]["preference_dataset"]["config"].update(max_train_pairs=16, max_validation_pairs=8, samples=2)
    cfg["ops"]["lora_checkpoint"]["config"].update(eval_every=6, tuning_prompts=2)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, cfg, [*UPSTREAM, "base_checkpoint", *POST], instance)
    return project, instance, result


def rows(project: Path, asset: str, split: str) -> list[dict]:
    return pq.read_table(project / f"data/lake/{asset}/{split}.parquet").to_pylist()


def documents(project: Path, split: str) -> dict[str, str]:
    table = dedup.read_split(project / "data/lake/deduped_shards", split)
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))


def derivations(md: dict) -> dict[str, tuple[int, int]]:
    """sft_dataset's `derivations` table as {derivation: (train, validation)}."""
    lines = [line.strip("| ").split(" | ") for line in md["derivations"].splitlines()[2:]]
    return {name: (int(train), int(held)) for name, train, held in lines}


def test_a_prose_corpus_runs_the_whole_graph_with_no_user_files(prose_run):
    project, instance, result = prose_run
    assert result.success
    md = metadata(instance, "sft_dataset")
    assert md["user_files"] == 0 and md["bad_records"] == "none"
    counts = derivations(md)
    assert counts["docstring"] == (0, 0), md["derivations"]
    assert all(counts[task][0] > 0 and counts[task][1] > 0 for task in ("continuation", "section"))
    assert md["train_examples"] == 200 == sum(train for train, _ in counts.values())  # max_corpus_pairs
    assert md["validation_examples"] == sum(held for _, held in counts.values())
    pm = metadata(instance, "preference_dataset")
    assert pm["user_files"] == 0 and pm["train_pairs"] > 0 and pm["validation_pairs"] > 0 and "ranked" in pm["negatives"]
    am = metadata(instance, "aligned_checkpoint")
    assert 0 <= am["aligned_preference_accuracy"] <= 1 and (project / "data/lake/aligned_checkpoint/merged").is_dir()


def test_prose_pairs_are_the_texts_own_words_on_their_documents_side(prose_run):
    project, instance, _ = prose_run
    for split in ("train", "validation"):
        docs = documents(project, split)
        chats = rows(project, "sft_dataset", split)
        assert chats and all(r["origin"] == "corpus" for r in chats)
        for r in chats:
            doc_id, task = r["source"].split("::")[0], r["source"].split("::")[1].split("@")[0]
            prompt, reply = r["messages"][0]["content"], r["messages"][-1]["content"]
            assert doc_id in docs and r["module"] == doc_id  # all of a document's pairs on its side
            assert reply in docs[doc_id]
            if task == "continuation":  # the passage comes right before the reply in the document
                passage = prompt.removeprefix("Continue this text:\n\n")
                assert passage in docs[doc_id] and docs[doc_id].index(passage) < docs[doc_id].index(reply)
            else:  # the section named is a heading of the document: "Part k of note i", or its title
                heading = re.match(r'Write the opening of (?:the section )?"(.+?)"', prompt).group(1)
                assert task == "section" and re.search(rf"^#+ {re.escape(heading)}$", docs[doc_id], re.M)
        prefs = rows(project, "preference_dataset", split)
        assert prefs and {r["negative"] for r in prefs} == {"ranked"}
        assert {r["source"].split("::")[0] for r in prefs} <= set(docs)


def test_hard_negatives_of_prose_are_other_passages_of_the_same_document(prose_run, tiny_config):
    project, instance, _ = prose_run
    cfg = tiny_config(["preference_dataset"])
    cfg["ops"]["preference_dataset"]["config"]["negatives"] = "hard"
    assert materialize(project, cfg, ["preference_dataset"], instance).success
    docs = {**documents(project, "train"), **documents(project, "validation")}
    prefs = rows(project, "preference_dataset", "train") + rows(project, "preference_dataset", "validation")
    assert prefs and {r["negative"] for r in prefs} == {"module"}  # every document has several passages
    for r in prefs:
        doc = docs[r["source"].split("::")[0]]
        assert r["chosen"] in doc and r["rejected"] in doc and r["chosen"] != r["rejected"]
