"""The two post-training datasets as Parquet: what the writers store, the readers give back."""

import pyarrow.parquet as pq

from llm_assets.lib.posttrain.posttrain_data import (CHAT_SCHEMA, PREFERENCE_SCHEMA, chat_row, read_chats,
                                                     read_preferences, split_file, write_chats, write_preferences)
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
