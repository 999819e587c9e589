import json
import sysconfig
from pathlib import Path

import pytest

from llm_assets.lib.data.corpus import CorpusFormatError
from llm_assets.lib.posttrain.instructions import (
    InstructionPair,
    derive_pairs,
    module_name,
    read_alpaca,
    read_chat_jsonl,
    to_messages,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_doc(rel: str) -> tuple[str, str]:
    return f"stdlib/{rel}", (STDLIB / rel).read_text(encoding="utf-8")


def test_module_name():
    assert module_name("stdlib/json/decoder.py") == "json.decoder"
    assert module_name("stdlib/json/__init__.py") == "json"
    assert module_name("stdlib/textwrap.py") == "textwrap"
    assert module_name("incoming/b.jsonl-1a2b3c4d#L3:pkg/mod.py") == "pkg.mod"  # named by its "path"


def test_derive_from_real_stdlib_modules():
    pairs = derive_pairs([stdlib_doc("textwrap.py"), stdlib_doc("json/decoder.py")])
    by_name = {f"{p.module}.{p.qualname}": p for p in pairs}

    dedent = by_name["textwrap.dedent"]
    assert dedent.instruction == "Explain what the Python function `textwrap.dedent(text)` does."
    assert dedent.output == "Remove any common leading whitespace from every line in `text`."
    assert dedent.input == "" and dedent.source_doc_id == "stdlib/textwrap.py"

    decode = by_name["json.decoder.JSONDecoder.decode"]
    assert decode.instruction == ("Explain what the Python method "
                                  "`json.decoder.JSONDecoder.decode(self, s, _w=WHITESPACE.match)` does.")
    assert decode.output.startswith("Return the Python representation of ``s``")
    # a class shows its __init__ arguments without self
    assert "`json.decoder.JSONDecoder(*, object_hook=None," in by_name["json.decoder.JSONDecoder"].instruction
    # a first paragraph ending in ':' carries the list it introduces
    assert by_name["json.decoder.JSONDecodeError"].output.startswith(
        "Subclass of ValueError with the following additional properties:\n\nmsg:")

    # private (and dunder) names are skipped; order is doc_id, then source position
    assert not any(part.startswith("_") for p in pairs for part in p.qualname.split("."))
    assert "json.decoder.JSONObject" not in by_name  # public but undocumented
    assert [p.source_doc_id for p in pairs] == sorted(p.source_doc_id for p in pairs)
    textwrap_names = [p.qualname for p in pairs if p.module == "textwrap"]
    assert textwrap_names.index("wrap") < textwrap_names.index("dedent") < textwrap_names.index("indent")
    assert all(20 <= len(p.output) <= 600 for p in pairs)
    assert derive_pairs(reversed([stdlib_doc("json/decoder.py"), stdlib_doc("textwrap.py")])) == pairs


def test_derive_skips_non_python_broken_short_and_private():
    src = '''
def public_function(a, b=1):
    """Add two numbers together and return the sum.

    More detail that is not part of the response.
    """

def _private(x):
    """A private helper that should never become a pair."""

def terse():
    """Too short."""

class Widget:
    """A widget that holds a value for later."""
    def __init__(self, value):
        """Store the value inside the widget instance."""
    def _hidden(self):
        """Hidden method docstring long enough."""

if True:
    def platform_specific():
        """Defined inside an if block at module level."""
'''
    docs = [("raw/pkg/mod.py", src), ("stdlib/notes.txt", "def f():\n    '''Not python by name.'''"),
            ("stdlib/broken.py", "def oops(:\n")]
    pairs = derive_pairs(docs)
    assert [(p.module, p.qualname) for p in pairs] == [
        ("pkg.mod", "public_function"), ("pkg.mod", "Widget"), ("pkg.mod", "platform_specific")]
    assert pairs[0].output == "Add two numbers together and return the sum."
    assert pairs[1].instruction == "Explain what the Python class `pkg.mod.Widget(value)` does."


def test_validation_pairs_come_only_from_the_docs_given():
    train_docs = [stdlib_doc("textwrap.py")]
    validation_docs = [stdlib_doc("json/decoder.py")]
    train, validation = derive_pairs(train_docs), derive_pairs(validation_docs)
    assert {p.source_doc_id for p in train} == {"stdlib/textwrap.py"}
    assert {p.source_doc_id for p in validation} == {"stdlib/json/decoder.py"}


def test_max_pairs_spreads_over_the_ordered_list():
    docs = [stdlib_doc("textwrap.py"), stdlib_doc("json/decoder.py")]
    everything = derive_pairs(docs)
    some = derive_pairs(docs, max_pairs=4)
    assert len(some) == 4 and all(p in everything for p in some)
    assert {p.module for p in some} == {"json.decoder", "textwrap"}


def test_to_messages():
    pair = InstructionPair("Summarize.", "Some text.", "A summary.", "x")
    assert to_messages(pair) == [{"role": "user", "content": "Summarize.\n\nSome text."},
                                 {"role": "assistant", "content": "A summary."}]
    assert to_messages(InstructionPair("Hi?", "", "Hello.", "x"))[0]["content"] == "Hi?"


def test_read_alpaca_json_and_jsonl(tmp_path: Path):
    records = [{"instruction": "Add.", "input": "1 2", "output": "3"},
               {"instruction": "Greet.", "output": "Hello."}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (from_json, bad_json), (from_jsonl, bad_jsonl) = read_alpaca(tmp_path / "a.json"), read_alpaca(tmp_path / "a.jsonl")
    assert [(p.instruction, p.input, p.output) for p in from_json] == [("Add.", "1 2", "3"), ("Greet.", "", "Hello.")]
    assert [(p.instruction, p.input, p.output) for p in from_jsonl] == [(p.instruction, p.input, p.output) for p in from_json]
    assert [p.source_doc_id for p in from_json] == ["a.json#L2", "a.json#L7"]
    assert [p.source_doc_id for p in from_jsonl] == ["a.jsonl#L1", "a.jsonl#L2"]
    assert (bad_json.read, bad_json.total, bad_jsonl.read, bad_jsonl.total) == (2, 0, 2, 0)
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert read_alpaca(tmp_path / "empty.json")[0] == []


@pytest.mark.parametrize("name,text,reason,where,message", [
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "missing_field", "missing.jsonl:2",
     "missing field 'output'"),
    ("null.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n', "missing_field",
     "null.jsonl:2", "field 'output' is null"),
    ("empty.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "  \\n "}\n', "empty_reply",
     "empty.jsonl:2", "field 'output' is empty"),
    ("type.jsonl", '{"instruction": "a", "input": 3, "output": "b"}\n{"instruction": "a", "output": "b"}\n', "wrong_type",
     "type.jsonl:1", "field 'input' must be a string"),
    ("list.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c",\n  "output": ""}\n]', "empty_reply",
     "list.json:3: item 1", "field 'output' is empty"),
    ("list_missing.json", '[{"instruction": "a", "output": "b"},\n\n{"output": "b"}]', "missing_field",
     "list_missing.json:3: item 1", "missing field 'instruction'"),
])
def test_read_alpaca_drops_and_counts_unusable_records(tmp_path: Path, name, text, reason, where, message):
    (tmp_path / name).write_text(text)
    pairs, bad = read_alpaca(tmp_path / name)
    assert len(pairs) == 1 and bad.read == 2 and dict(bad.dropped) == {reason: 1}
    assert bad.where == {reason: [where]}
    assert bad.first[reason].startswith(f"{tmp_path / where}: {message}")  # the full path, for the failure message


@pytest.mark.parametrize("name,text,match", [
    ("badjson.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": \n', r"badjson\.jsonl:3: invalid JSON"),
    ("notlist.json", '{"instruction": "a", "output": "b"}', r"notlist\.json:1: expected a JSON list"),
    ("badlist.json", '[{"instruction": "a", "output": "b"}\n {"instruction": "a"}]', r"badlist\.json:2: expected ',' or ']'"),
    ("nonobj.json", '[\n"just a string"]', r"nonobj\.json:2: item 0: expected a JSON object"),
    ("trailing.json", '[{"instruction": "a", "output": "b"},\n]', r"trailing\.json:2: trailing ','"),
    ("data.csv", "instruction,output\n", r"data\.csv: unsupported"),
])
def test_read_alpaca_malformed_json_fails_naming_file_and_line(tmp_path: Path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(CorpusFormatError, match=match):
        read_alpaca(tmp_path / name)


@pytest.mark.parametrize("name", ["bad.json", "bad.jsonl"])
def test_read_alpaca_invalid_utf8_names_file_and_line(tmp_path: Path, name):
    good = b'{"instruction": "a", "output": "b"}'
    body = b"[" + good + b",\n" + good.replace(b'"b"', b'"\xff"') + b"]" if name.endswith(".json") else (
        good + b"\n" + good.replace(b'"b"', b'"\xff"') + b"\n")
    (tmp_path / name).write_bytes(body)
    with pytest.raises(CorpusFormatError, match=rf"{name}:2: invalid UTF-8"):
        read_alpaca(tmp_path / name)


def test_read_chat_jsonl(tmp_path: Path):
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello.", "weight": 1}]},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    read, bad = read_chat_jsonl(tmp_path / "c.jsonl")
    assert read == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}], "c.jsonl#L1"),
        ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "c.jsonl#L2")]
    assert bad.total == 0


def _chat(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


@pytest.mark.parametrize("line,reason,match", [
    ('{"conversation": []}', "missing_field", "missing field 'messages'"),
    ('{"messages": []}', "bad_chat", "non-empty list"),
    (_chat(("user", "Hi")), "bad_chat", "last message must be an assistant turn"),
    (_chat(("user", "Hi"), ("assistant", "   ")), "empty_reply", "final assistant turn is empty"),
    (_chat(("user", "Hi"), ("bot", "Hello")), "bad_chat", "message 1: unknown role 'bot'"),
    (_chat(("system", "Rules"), ("assistant", "Hello")), "bad_chat", "no user turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "missing_field",
     "message 0: missing field 'content'"),
])
def test_read_chat_jsonl_drops_and_counts_unusable_records(tmp_path: Path, line, reason, match):
    good = _chat(("user", "Hi"), ("assistant", "Hello"))
    (tmp_path / "c.jsonl").write_text(f"{good}\n{good}\n{line}\n{good}\n")
    chats, bad = read_chat_jsonl(tmp_path / "c.jsonl")
    assert [source for _, source in chats] == ["c.jsonl#L1", "c.jsonl#L2", "c.jsonl#L4"]  # sources stay aligned
    assert bad.read == 4 and dict(bad.dropped) == {reason: 1} and bad.where[reason][0].startswith("c.jsonl:3")
    assert f"c.jsonl:3: " in bad.first[reason] and match in bad.first[reason]


def test_a_corpus_derived_again_is_parsed_once_and_a_changed_one_again(monkeypatch):
    from llm_assets.lib.posttrain import instructions

    parsed = []
    real = instructions.pairs_from_source
    monkeypatch.setattr(instructions, "pairs_from_source", lambda d, t: parsed.append(d) or real(d, t))
    source = 'def f():\n    """Return one more than it was given."""\n'
    docs = [stdlib_doc("textwrap.py"), ("stdlib/fresh_for_this_test.py", source)]
    first = derive_pairs(docs)
    first.clear()  # the caller's list: the kept one stays whole
    again, capped = derive_pairs(reversed(docs)), derive_pairs(docs, max_pairs=2)
    assert len(parsed) == 2 and again and len(capped) == 2  # the second and third calls parsed nothing
    changed = derive_pairs([docs[0], (docs[1][0], source.replace("one more", "two more"))])
    assert len(parsed) == 4 and changed[0].output == "Return two more than it was given."
