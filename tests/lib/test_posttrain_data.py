"""The two post-training datasets as Parquet: what the writers store, the readers give back."""

import json

import pyarrow.parquet as pq
import pytest

from llm_assets.lib.data.bad_records import CorpusFormatError, TooManyBadRecords
from llm_assets.lib.posttrain.posttrain_data import (CHAT_SCHEMA, PREFERENCE_SCHEMA, chat_row, read_chats,
                                                     read_preference_file, read_preferences, read_sft_file,
                                                     read_sources, split_file, write_chats, write_preferences)
from llm_assets.lib.posttrain.preferences import PreferencePair

CHATS = [
    [{"role": "user", "content": "Summarize `f`."}, {"role": "assistant", "content": "It adds one. 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "a literal <|end|> stays text"}],
]


def test_chats_read_back_as_written(tmp_path):
    write_chats(tmp_path, "train", [chat_row(c, f"doc::{i}", "corpus", "pkg.mod") for i, c in enumerate(CHATS)])
    assert split_file(tmp_path, "train") == tmp_path / "train.parquet"
    assert pq.read_schema(split_file(tmp_path, "train")) == CHAT_SCHEMA
    assert read_chats(tmp_path, "train") == CHATS
    assert read_sources(tmp_path, "train") == ["doc::0", "doc::1"]
    write_chats(tmp_path, "validation", [])
    assert read_chats(tmp_path, "validation") == []


def test_preferences_read_back_with_the_prompt_as_messages(tmp_path):
    messages = [{"role": "user", "content": "Which is right?"}]
    pairs = [PreferencePair(messages, "yes", "no", "f.jsonl#L1"),
             PreferencePair("plain prompt", "good", "bad", "doc::f", "module")]
    write_preferences(tmp_path, "validation", pairs)
    assert pq.read_schema(split_file(tmp_path, "validation")) == PREFERENCE_SCHEMA
    assert read_preferences(tmp_path, "validation") == [
        pairs[0], PreferencePair([{"role": "user", "content": "plain prompt"}], "good", "bad", "doc::f", "module")]


HH = "\n\nHuman: {q}\n\nAssistant: Sure.\n\nHuman: And then?\n\nAssistant:"


def _hh(i: int, chosen: str, rejected: str, other_prompt: bool = False) -> str:
    prompt = HH.format(q=f"Question {i}?")
    return json.dumps({"chosen": prompt + chosen, "rejected": (HH.format(q="Else?") if other_prompt else prompt) + rejected})


def _hh_file(path, good: int) -> None:
    """`good` usable records, then the three unusable kinds public HH-RLHF files hold, on lines good+1..good+3."""
    lines = [_hh(i, f" Yes {i}.", f" No {i}.") for i in range(good)]
    lines += [_hh(good, "", " No."), _hh(good + 1, " Same.", " Same. "), _hh(good + 2, " Yes.", " No.", other_prompt=True)]
    path.write_text("\n".join(lines) + "\n")


def test_hh_file_with_a_few_unusable_records_is_read_and_they_are_counted(tmp_path):
    _hh_file(tmp_path / "hh.jsonl", good=60)  # 3 of 63 unusable: 4.8%
    pairs, bad = read_preference_file(tmp_path / "hh.jsonl")
    assert len(pairs) == 60 and bad.read == 63
    assert bad.rows() == [("empty_reply", 1, "hh.jsonl:61"), ("identical_replies", 1, "hh.jsonl:62"),
                          ("different_prefix", 1, "hh.jsonl:63")]


def test_hh_file_with_too_many_unusable_records_fails_naming_the_counts(tmp_path):
    _hh_file(tmp_path / "hh.jsonl", good=20)  # 3 of 23: 13%
    with pytest.raises(TooManyBadRecords, match=r"hh\.jsonl: 3 of 23 records unusable \(13\.0% > max_bad_record_share "
                                                r"5\.0%\): empty_reply 1 \(.*hh\.jsonl:21: .*\), identical_replies 1"):
        read_preference_file(tmp_path / "hh.jsonl")
    assert read_preference_file(tmp_path / "hh.jsonl", max_bad_share=0.2)[1].total == 3  # the limit is a setting
    (tmp_path / "none.jsonl").write_text(_hh(0, "", " No.") + "\n" + _hh(1, " A.", " A.") + "\n")
    with pytest.raises(TooManyBadRecords, match=r"2 of 2 records unusable \(100\.0% no record usable\)"):
        read_preference_file(tmp_path / "none.jsonl", max_bad_share=1.0)  # all bad: never a silent empty file


def test_alpaca_file_with_a_missing_field_in_one_record_of_many(tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(40)]
    records[7] = {"instruction": "Say it."}
    (tmp_path / "a.json").write_text(json.dumps(records, indent=1))
    chats, bad = read_sft_file(tmp_path / "a.json")
    assert len(chats) == 39 and "a.json#L" in chats[7][1] and bad.rows()[0][:2] == ("missing_field", 1)
    assert bad.rows()[0][2].startswith("a.json:") and "item 7" in bad.rows()[0][2]


def test_malformed_json_is_fatal_at_once_naming_file_and_line(tmp_path):
    lines = [_hh(i, " Yes.", " No.") for i in range(40)]
    lines[5] = lines[5][:-3]
    (tmp_path / "hh.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusFormatError, match=r"hh\.jsonl:6: invalid JSON"):
        read_preference_file(tmp_path / "hh.jsonl", max_bad_share=1.0)
