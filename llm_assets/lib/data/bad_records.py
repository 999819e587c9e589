r"""Records that parse but cannot be used (an empty reply, a missing field, identical replies, ...):
dropped and counted per reason with the first few `file:line`, never fatal one by one. A file fails
only when its share of such records exceeds `max_bad_record_share`: then it is probably not the
format it looks like, and the error says so with the counts.

    >>> from llm_assets.lib.data.bad_records import BadRecord, BadRecords, read_records
    >>> def parse(record, where):                         # raises BadRecord for an unusable record
    ...     if not record.get("text"):
    ...         raise BadRecord("missing_field", where, "missing field 'text'")
    ...     return record["text"]
    >>> bad = BadRecords()
    >>> list(read_records([("a.jsonl:1", {"text": "ok"}), ("a.jsonl:2", {})], parse, bad))
    ['ok']
    >>> bad.read, dict(bad.dropped), bad.where
    (2, {'missing_field': 1}, {'missing_field': ['a.jsonl:2']})
    >>> bad.check(0.05, "a.jsonl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    llm_assets.lib.data.bad_records.TooManyBadRecords: a.jsonl: 1 of 2 records unusable (50.0% > max_bad_record_share 5.0%): missing_field 1 (a.jsonl:2: missing field 'text')

Malformed JSON or invalid UTF-8 stays fatal at once (`CorpusFormatError`, naming the file and line):
the rest of such a file cannot be trusted to be read as its author meant. `BadRecord` is a
`CorpusFormatError` too, so a reader called outside `read_records` still fails with `file:line`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import Field

from llm_assets.lib.common.settings import Settings

T = TypeVar("T")
MAX_BAD_RECORD_SHARE = 0.05
EXAMPLES = 3  # locations kept per reason: enough to find the pattern, short enough for metadata


class CorpusFormatError(ValueError):
    """A user file is structurally malformed; the message names the file and line or row."""


class BadRecord(CorpusFormatError):
    """One record that parses but cannot be used. `reason` is a short key (missing_field,
    wrong_type, empty_field, empty_reply, bad_chat, identical_replies, different_prefix), `where`
    the "file:line" it was read from."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason, self.where = reason, where


class TooManyBadRecords(CorpusFormatError):
    """A file whose share of unusable records is above max_bad_record_share."""


class RecordRules(Settings):
    """How many unusable records a user file may hold; inherited by every asset config that reads
    user files, so the field is written once."""

    max_bad_record_share: float = Field(MAX_BAD_RECORD_SHARE, ge=0, le=1, description=(
        "Share of a user file's records that may be unusable (an empty reply, identical replies, dialogues that "
        "differ before the final reply, a missing or mistyped field): they are dropped and counted per reason "
        "with their file:line in metadata. Above it the run fails with the counts. Malformed JSON always fails."))


@dataclass
class BadRecords:
    """Records read and those dropped, per reason, with the first few locations of each."""

    read: int = 0  # records read: kept and dropped
    dropped: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)  # reason -> first EXAMPLES "file:line"
    first: dict[str, str] = field(default_factory=dict)  # reason -> its first error message, in full

    def drop(self, error: BadRecord) -> None:
        self.dropped[error.reason] += 1
        places = self.where.setdefault(error.reason, [])
        if len(places) < EXAMPLES:
            places.append(Path(error.where).name)  # the file name and line: paths make metadata unreadable
        self.first.setdefault(error.reason, str(error))

    def add(self, other: BadRecords) -> None:
        """Merge another file's tally into this one (the asset's totals)."""
        self.read += other.read
        for reason, n in other.dropped.items():
            self.dropped[reason] += n
            self.where[reason] = (self.where.get(reason, []) + other.where[reason])[:EXAMPLES]
            self.first.setdefault(reason, other.first[reason])

    @property
    def total(self) -> int:
        return sum(self.dropped.values())

    @property
    def share(self) -> float:
        return self.total / self.read if self.read else 0.0

    def check(self, max_share: float, what: str) -> None:
        """Raise TooManyBadRecords naming `what` (the file), the counts and the first error per
        reason when the dropped share is above max_share, or when every record was dropped."""
        if self.share <= max_share and not (self.read and self.total == self.read):
            return
        reasons = ", ".join(f"{r} {n} ({self.first[r]})" for r, n in self.dropped.most_common())
        limit = "no record usable" if self.total == self.read else f"> max_bad_record_share {max_share:.1%}"
        raise TooManyBadRecords(f"{what}: {self.total} of {self.read} records unusable ({self.share:.1%} {limit}): "
                                f"{reasons}")

    def rows(self) -> list[tuple[str, int, str]]:
        """(reason, records dropped, first locations) for a metadata table, most frequent first."""
        return [(r, n, ", ".join(self.where[r])) for r, n in self.dropped.most_common()]


def read_records(records: Iterable[tuple[str, dict]], parse: Callable[[dict, str], T],
                 bad: BadRecords) -> Iterator[T]:
    """parse(record, where) for each (where, record); a record it refuses with BadRecord is counted
    in `bad` and skipped. Any other error (malformed JSON from the iterator) propagates."""
    for where, record in records:
        bad.read += 1
        try:
            yield parse(record, where)
        except BadRecord as e:
            bad.drop(e)
