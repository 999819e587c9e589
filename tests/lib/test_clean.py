import pytest

from llm_assets.lib.data.clean import CleanRules, NoDocumentsLeftError, clean_documents, normalize
from llm_assets.lib.data.corpus import Document

PROSE = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
    "complex. Complex is better than complicated. Flat is better than nested. Sparse is better "
    "than dense. Readability counts. Special cases aren't special enough to break the rules. "
)


def doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, "user", "p", text, len(text.encode()))


def test_normalize():
    assert normalize("\n\r\nA\u0301 line  \r\nnext\x00\x07 line\t\n\n") == "\u00c1 line\nnext line"


@pytest.mark.parametrize(
    "text, rule",
    [
        ("short text", "too_short"),
        (PROSE + "\x01" * 5, "control_chars"),
        (PROSE + "\ufffd" * 5, "invalid_utf8"),
        (PROSE + "x" * 3000, "long_lines"),
        ("1234 5678 9012 3456 " * 20, "low_alpha"),
        ("repeat this same line\n" * 40 + PROSE, "repetition"),
    ],
)
def test_each_rule_removes_and_counts(text: str, rule: str):
    kept, report = clean_documents([doc("bad", text), doc("good", PROSE)], CleanRules())
    assert [d.doc_id for d in kept] == ["good"]
    assert report.removed == {rule: 1}
    assert report.examples[rule] == ["bad"]


def test_crlf_files_are_not_binary():
    kept, report = clean_documents([doc("crlf", PROSE.replace(". ", ".\r\n"))], CleanRules())
    assert len(kept) == 1 and "\r" not in kept[0].text


def test_too_long():
    kept, report = clean_documents([doc("long", (PROSE + "\n") * 10), doc("ok", PROSE)], CleanRules(max_chars=400))
    assert report.removed == {"too_long": 1}


def test_nothing_left_is_a_clear_error():
    with pytest.raises(NoDocumentsLeftError, match=r"no documents left after cleaning \(2 in; removed by too_short: 2\)"):
        clean_documents([doc("a", "tiny"), doc("b", "also tiny")], CleanRules())
