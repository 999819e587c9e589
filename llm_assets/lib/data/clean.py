r"""Clean corpus: normalize text, then drop documents that fail a quality rule.

    >>> from llm_assets.lib.data.clean import CleanRules, clean_documents
    >>> from llm_assets.lib.data.corpus import Document
    >>> texts = {"prose": "A readable document,\r\nwritten on Windows.  \r\nThe end.\n",
    ...          "table": "".join(f"{i} {i * i} {i ** 3}\n" for i in range(9)), "short": "tiny"}
    >>> docs = [Document(k, "user", f"{k}.txt", t, len(t.encode())) for k, t in texts.items()]
    >>> kept, report = clean_documents(docs, CleanRules(min_chars=20))
    >>> [d.doc_id for d in kept], dict(report.removed)
    (['prose'], {'low_alpha': 1, 'too_short': 1})
    >>> kept[0].text                  # CRLF -> LF, trailing spaces and the final newline stripped
    'A readable document,\nwritten on Windows.\nThe end.'

Normalization (every kept document): Unicode NFC, CRLF/CR to LF, control characters other than tab
and newline removed, trailing whitespace stripped per line, leading/trailing blank lines removed.

Rules, checked in this order; a document is counted under the first rule it fails:
  control_chars     share of control characters before normalization above the limit (binary data)
  invalid_utf8      share of U+FFFD replacement characters above the limit (broken encoding)
  too_short         fewer characters than the minimum after normalization
  too_long          more characters than the maximum
  long_lines        a line longer than the limit (minified code, embedded data blobs)
  low_alpha         share of letters below the limit (number tables, hex dumps)
  repetition        share of characters in non-blank lines that repeat an earlier line above the
                    limit (weighted by characters, as in Gopher's filters, so that short repeated
                    lines such as `pass` or `return` in code do not count much)
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace

from pydantic import ConfigDict, Field

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.data.corpus import Document

RULES = ("control_chars", "invalid_utf8", "too_short", "too_long", "long_lines", "low_alpha", "repetition")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # keeps \t and \n; \r is handled first
_CONTROL_NOT_CR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # CRLF line ends are not binary
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)


class NoDocumentsLeftError(ValueError):
    """Every document was filtered out; the message says which rules removed them."""


class CleanRules(Settings):
    """Thresholds of the quality rules; the launchpad of `clean_corpus` (and of `incoming_batch`)."""

    model_config = ConfigDict(frozen=True)

    min_chars: int = Field(200, description="Drop documents shorter than this many characters after normalization.")
    max_chars: int = Field(1_000_000, description="Drop documents longer than this many characters.")
    max_line_chars: int = Field(2_000, description="Drop documents with a line longer than this many characters "
                                                   "(minified code, data blobs).")
    min_alpha_share: float = Field(0.25, description="Drop documents whose share of letters is lower.")
    max_repeated_line_share: float = Field(0.6, description="Drop documents where a larger share of characters sits in "
                                                            "repeated lines.")
    max_control_share: float = Field(0.001, description="Drop documents with a higher share of control characters.")
    max_replacement_share: float = Field(0.001, description="Drop documents with a higher share of U+FFFD (invalid UTF-8).")


@dataclass
class CleanReport:
    documents_in: int = 0
    documents_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # rule -> a few removed doc_ids


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    return text.strip("\n")


def failed_rule(original: str, text: str, rules: CleanRules) -> str | None:
    """The first rule `text` (normalized from `original`) fails, or None if it passes them all."""
    n_orig = max(len(original), 1)
    if len(_CONTROL_NOT_CR.findall(original)) / n_orig > rules.max_control_share:
        return "control_chars"
    if original.count("\ufffd") / n_orig > rules.max_replacement_share:
        return "invalid_utf8"
    if len(text) < rules.min_chars:
        return "too_short"
    if len(text) > rules.max_chars:
        return "too_long"
    lines = text.split("\n")
    if max(map(len, lines)) > rules.max_line_chars:
        return "long_lines"
    if sum(c.isalpha() for c in text) / len(text) < rules.min_alpha_share:
        return "low_alpha"
    if repeated_line_share(lines) > rules.max_repeated_line_share:
        return "repetition"
    return None


def repeated_line_share(lines: list[str]) -> float:
    """Share of non-blank characters that sit in a line seen before in the same document."""
    seen: set[str] = set()
    repeated = total = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def clean_documents(docs: list[Document], rules: CleanRules, n_examples: int = 3) -> tuple[list[Document], CleanReport]:
    report = CleanReport(documents_in=len(docs))
    kept: list[Document] = []
    for doc in docs:
        report.chars_in += len(doc.text)
        text = normalize(doc.text)
        rule = failed_rule(doc.text, text, rules)
        if rule is None:
            kept.append(replace(doc, text=text))
            report.chars_out += len(text)
            continue
        report.removed[rule] += 1
        examples = report.examples.setdefault(rule, [])
        if len(examples) < n_examples:
            examples.append(doc.doc_id)
    report.documents_out = len(kept)
    if not kept:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.removed.most_common()) or "no input documents"
        raise NoDocumentsLeftError(
            f"no documents left after cleaning ({report.documents_in} in; removed by {reasons}). "
            "Check the corpus sources or relax the CleanConfig thresholds.")
    return kept, report
