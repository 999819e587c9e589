"""Unusable records: counted per reason with their first locations, fatal only above the share."""

import pytest

from llm_assets.lib.data.bad_records import (BadRecord, BadRecords, CorpusFormatError, RecordRules, TooManyBadRecords,
                                             read_records)


def parse(record: dict, where: str) -> str:
    if "text" not in record:
        raise BadRecord("missing_field", where, "missing field 'text'")
    if not record["text"]:
        raise BadRecord("empty_field", where, "field 'text' is empty")
    return record["text"]


def tally(records: list[dict], name: str = "/data/f.jsonl") -> tuple[list[str], BadRecords]:
    bad = BadRecords()
    kept = list(read_records(((f"{name}:{i + 1}", r) for i, r in enumerate(records)), parse, bad))
    return kept, bad


def test_unusable_records_are_counted_per_reason_with_their_first_locations():
    kept, bad = tally([{"text": "a"}, {}, {"text": ""}, {}, {}, {}, {"text": "b"}])
    assert kept == ["a", "b"] and bad.read == 7 and bad.total == 5 and bad.share == pytest.approx(5 / 7)
    assert bad.rows() == [("missing_field", 4, "f.jsonl:2, f.jsonl:4, f.jsonl:5"), ("empty_field", 1, "f.jsonl:3")]
    assert bad.first["missing_field"] == "/data/f.jsonl:2: missing field 'text'"  # the full path, for the error


def test_the_share_is_judged_against_the_limit_and_an_all_bad_file_always_fails():
    _, bad = tally([{"text": str(i)} for i in range(19)] + [{}])  # 1 of 20: 5%
    bad.check(0.05, "f.jsonl")
    with pytest.raises(TooManyBadRecords, match=r"f\.jsonl: 1 of 20 records unusable \(5\.0% > max_bad_record_share "
                                                r"4\.0%\): missing_field 1 \(/data/f\.jsonl:20: missing field 'text'\)"):
        bad.check(0.04, "f.jsonl")
    _, every = tally([{}, {"text": ""}])
    with pytest.raises(TooManyBadRecords, match=r"2 of 2 records unusable \(100\.0% no record usable\): "
                                                r"missing_field 1 .*, empty_field 1"):
        every.check(1.0, "f.jsonl")
    BadRecords().check(0.0, "empty.jsonl")  # no records, nothing to judge (readers refuse empty files themselves)


def test_tallies_merge_and_malformed_input_is_never_counted():
    _, a = tally([{}, {"text": "x"}], "/d/a.jsonl")
    _, b = tally([{}, {}, {}], "/d/b.jsonl")
    a.add(b)
    assert (a.read, a.total, a.where) == (5, 4, {"missing_field": ["a.jsonl:1", "b.jsonl:1", "b.jsonl:2"]})

    def broken():
        yield "f.jsonl:1", {"text": "ok"}
        raise CorpusFormatError("f.jsonl:2: invalid JSON")

    with pytest.raises(CorpusFormatError, match="invalid JSON"):
        list(read_records(broken(), parse, BadRecords()))
    assert issubclass(BadRecord, CorpusFormatError) and issubclass(TooManyBadRecords, CorpusFormatError)


def test_the_setting_is_a_share():
    assert RecordRules().max_bad_record_share == 0.05
    with pytest.raises(ValueError, match="max_bad_record_share"):
        RecordRules(max_bad_record_share=1.5)
