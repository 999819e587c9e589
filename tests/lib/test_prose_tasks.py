import sysconfig
from pathlib import Path

import pytest

from llm_assets.lib.posttrain.instructions import MIN_RESPONSE_CHARS, derive_pairs
from llm_assets.lib.posttrain.prose_tasks import (MAX_PAIRS_PER_TASK, MAX_REPLY_CHARS, MIN_PASSAGE_CHARS,
                                                  PASSAGE_CHARS, TASKS, pairs_from_text)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LICENCE = (STDLIB / "LICENSE.txt").read_text()


def sentences(n: int, start: int = 0) -> str:
    return " ".join(f"Sentence number {i} says one plain thing about the river." for i in range(start, start + n))


def test_continuations_cut_at_sentences_and_stay_in_their_paragraph():
    text = f"{sentences(4)}\n\n{sentences(12, 4)}\n\n{sentences(3, 16)}"
    pairs = pairs_from_text("raw/river.txt", text)
    assert pairs and {p.task for p in pairs} == {"continuation"}
    for p in pairs:
        passage = p.instruction.removeprefix("Continue this text:\n\n")
        cut = int(p.qualname.removeprefix("continuation@"))
        assert text[cut:].startswith(p.output) and text[:cut].rstrip().endswith(passage)  # passage, then reply
        assert MIN_PASSAGE_CHARS <= len(passage) <= PASSAGE_CHARS and passage.startswith("Sentence number")
        assert MIN_RESPONSE_CHARS <= len(p.output) <= MAX_REPLY_CHARS and p.output.endswith("river.")
        assert "\n\n" not in p.output  # never past the paragraph's end
        assert (p.source_doc_id, p.module, p.input) == ("raw/river.txt", "raw/river.txt", "")
    offsets = [int(p.qualname.split("@")[1]) for p in pairs]
    assert offsets == sorted(offsets) and len(pairs) == MAX_PAIRS_PER_TASK  # 18 cuts, 8 spread evenly
    assert offsets[0] < len(text) // 4 and offsets[-1] > len(text) // 2
    assert pairs_from_text("raw/river.txt", text) == pairs  # deterministic


def test_sections_name_their_heading_and_the_title():
    body = sentences(2)
    text = f"# Rivers\n\n{body}\n\n## Where they start\n\n{body}\n\n## 3\n\n{body}\n\nDeltas\n------\n\n{body}\n"
    asks = [p.instruction for p in pairs_from_text("raw/rivers.md", text) if p.task == "section"]
    assert asks == ['Write the opening of "Rivers".', 'Write the opening of the section "Where they start" of "Rivers".',
                    'Write the opening of the section "Deltas" of "Rivers".']  # "## 3" names nothing
    untitled = pairs_from_text("raw/x.md", f"## Where they start\n{body}")  # a heading right above its text
    assert [p.instruction for p in untitled if p.task == "section"] == ['Write the opening of "Where they start".']
    rst = pairs_from_text("raw/x.txt", f"Rivers\n******\n\n{body}\n\nSources\n=======\n\n{body}")
    assert [p.instruction for p in rst if p.task == "section"][-1] == 'Write the opening of the section "Sources" of "Rivers".'


def test_code_tables_and_dangling_introductions_are_never_replies():
    intro = sentences(3)
    text = (f"{intro}\n\n```\n{sentences(2)}\n\n{sentences(2)}\n```\n\n    {sentences(2)}\n    {sentences(1)}\n\n"
            f"| {sentences(2)} |\n\nThe list that follows has these three items in it:\n\n- one")
    replies = [p.output for p in pairs_from_text("raw/code.md", text)]
    assert replies == [sentences(1, 2)]  # the first paragraph's last sentence: the only one with a passage before


@pytest.mark.parametrize("text, first_reply", [
    # "e.g. the" goes on (else "the first one here." would be the first reply)
    ("One sentence that is long enough to be a passage, e.g. the first one here. " * 2 + "The reply is this one.",
     "The reply is this one."),
    ("河流从山上流下来，经过平原和城市，最后流进大海。" * 6, "河流从山上流下来，经过平原和城市，最后流进大海。" * 2),  # no spaces
], ids=["abbreviation", "chinese"])
def test_sentence_ends(text, first_reply):
    pairs = pairs_from_text("raw/t.txt", text)
    assert pairs and pairs[0].output == first_reply


def test_nothing_to_derive():
    assert pairs_from_text("raw/empty.txt", "") == []
    assert pairs_from_text("raw/short.txt", "Too short to continue.") == []
    assert pairs_from_text("raw/one.txt", sentences(1) * 3 + "x" * 500) == []  # the only reply would be over MAX_REPLY_CHARS


def test_derive_pairs_gives_code_docstrings_user_text_prose_and_stdlib_docs_nothing():
    python = ("stdlib/textwrap.py", (STDLIB / "textwrap.py").read_text())
    docs = [python, ("raw/LICENSE.txt", LICENCE), ("stdlib/LICENSE.txt", LICENCE),
            ("stdlib-doc/pydoc_topics/if", "The if statement is used for conditional execution. " * 5)]
    pairs = derive_pairs(docs)
    by_doc = {d: {p.task for p in pairs if p.source_doc_id == d} for d, _ in docs}
    assert by_doc == {"stdlib/textwrap.py": {"docstring"}, "raw/LICENSE.txt": set(TASKS), "stdlib/LICENSE.txt": set(),
                      "stdlib-doc/pydoc_topics/if": set()}
    assert derive_pairs([python]) == [p for p in pairs if p.task == "docstring"]  # code alone: as before
    assert {p.task for p in derive_pairs(docs, max_pairs=10)} == {"docstring", *TASKS}  # spread over both
