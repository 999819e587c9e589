import json
import sysconfig
from pathlib import Path

import pytest
import torch

from llm_assets.lib.data.corpus import CorpusFormatError
from llm_assets.lib.posttrain.instructions import InstructionPair, derive_pairs
from llm_assets.lib.posttrain.generation import generate_replies
from llm_assets.lib.posttrain.instructions import to_messages
from llm_assets.lib.posttrain.preferences import (
    PreferencePair,
    derive_preferences,
    drop_identical,
    on_policy_preferences,
    ranked_preferences,
    read_hh_rlhf_jsonl,
    read_trl_jsonl,
)
from llm_assets.lib.pretrain.model import build_model
from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_pairs(*rels: str) -> list[InstructionPair]:
    return derive_pairs((f"stdlib/{r}", (STDLIB / r).read_text(encoding="utf-8")) for r in rels)


def test_derive_preferences_uses_hard_negatives_from_the_same_module():
    pairs = stdlib_pairs("textwrap.py", "json/decoder.py", "json/encoder.py")
    prefs, skipped = derive_preferences(pairs, seed=0)
    assert skipped == 0 and len(prefs) == len(pairs)
    module_of_answer = {}
    for p in pairs:
        module_of_answer.setdefault(p.output, p.module)
    for pair, pref in zip(pairs, prefs):
        assert pref.prompt == pair.instruction and pref.chosen == pair.output
        assert pref.rejected.strip() != pref.chosen.strip()
        # every module here has several documented definitions, so every negative is a hard one
        assert pref.negative == "module" and module_of_answer[pref.rejected] == pair.module
    dedent = next(p for p in prefs if p.source == "stdlib/textwrap.py::dedent")
    assert dedent.chosen == "Remove any common leading whitespace from every line in `text`."


def test_derive_preferences_is_deterministic_and_seeded():
    pairs = stdlib_pairs("textwrap.py", "json/decoder.py")
    assert derive_preferences(pairs, seed=0) == derive_preferences(pairs, seed=0)
    rejected = {s: [p.rejected for p in derive_preferences(pairs, seed=s)[0]] for s in range(4)}
    assert len({tuple(r) for r in rejected.values()}) > 1
    # a pair's negative does not depend on which other modules are present
    alone = derive_preferences([p for p in pairs if p.module == "textwrap"], seed=0)[0]
    both = [p for p in derive_preferences(pairs, seed=0)[0] if p.source.startswith("stdlib/textwrap.py")]
    assert alone == both


def _pair(qualname: str, module: str, output: str) -> InstructionPair:
    return InstructionPair(f"Explain `{module}.{qualname}`.", "", output, f"stdlib/{module}.py", qualname, module)


def test_negative_tiers_and_skip_when_no_distinct_answer():
    pairs = [
        _pair("a", "pkg.one", "Answer shared by a and b in one module."),
        _pair("b", "pkg.one", "Answer shared by a and b in one module."),
        _pair("c", "pkg.two", "The only definition documented in pkg.two."),
        _pair("d", "other", "The only definition of the package other."),
    ]
    prefs, skipped = derive_preferences(pairs)
    by_source = {p.source: p for p in prefs}
    # a and b have the same answer: their module offers no distinct negative, so the package does
    assert by_source["stdlib/pkg.one.py::a"].negative == "package"
    assert by_source["stdlib/pkg.one.py::a"].rejected == pairs[2].output
    assert by_source["stdlib/pkg.two.py::c"].negative == "package"
    assert by_source["stdlib/other.py::d"].negative == "any"
    assert skipped == 0 and len(prefs) == 4

    same = [_pair("x", "m", "Exactly the same text everywhere."), _pair("y", "n", "Exactly the same text everywhere. ")]
    assert derive_preferences(same) == ([], 2)


def test_on_policy_preferences_reject_the_models_reply_and_drop_copies_of_the_reference():
    pairs = stdlib_pairs("textwrap.py")[:4]
    replies = [f"  {pairs[0].output}\n", "", "wrap wrap wrap", " Wrap it. "]
    prefs, dropped = on_policy_preferences(pairs, replies)
    assert dropped == 1  # the first reply is the reference: no preference to learn
    assert [p.rejected for p in prefs] == ["", "wrap wrap wrap", "Wrap it."]  # empty: kept
    for pair, pref in zip(pairs[1:], prefs):
        assert pref.prompt == pair.instruction and pref.chosen == pair.output
        assert pref.source == f"stdlib/textwrap.py::{pair.qualname}" and pref.negative == "on_policy"
    with pytest.raises(ValueError, match="replies: 3 replies for 4"):
        on_policy_preferences(pairs, replies[:3])


def test_on_policy_rejected_is_the_models_own_reply_to_that_prompt():
    pairs = stdlib_pairs("textwrap.py", "json/decoder.py")[:6]
    tok = train_tokenizer([p.instruction + " " + p.output for p in pairs] * 3, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    replies = generate_replies(model, tok, [to_messages(p)[:-1] for p in pairs], max_new_tokens=6, batch_size=4)
    prefs, dropped = on_policy_preferences(pairs, replies)
    assert dropped == 0 and len(prefs) == len(pairs)
    # pair by pair, rejected is what the model answers that very prompt when asked alone
    for pref in prefs[::2]:
        alone = generate_replies(model, tok, [[{"role": "user", "content": pref.prompt}]], max_new_tokens=6)
        assert pref.rejected == alone[0] and pref.rejected != pref.chosen


def test_ranked_preferences_take_the_best_reply_over_the_worst_and_drop_prompts_without_a_gap():
    pairs = stdlib_pairs("textwrap.py")[:3]
    candidates = [["wrap it", "Wrap text.", "no", " no"], ["a", "b"], ["same", " same "]]
    scores = [[0.2, 0.6, 0.0, 0.1], [0.31, 0.3], [0.9, 0.1]]
    prefs, none = ranked_preferences(pairs, candidates, scores, min_gap=0.05)
    # the second prompt's replies score alike, the third's are the same text: no preference to learn
    assert none == 2 and [(p.chosen, p.rejected, p.negative) for p in prefs] == [("Wrap text.", "no", "ranked")]
    assert prefs[0].prompt == pairs[0].instruction and prefs[0].source == f"stdlib/textwrap.py::{pairs[0].qualname}"
    # several per prompt: worst first, each distinct text once
    several, _ = ranked_preferences(pairs[:1], candidates[:1], scores[:1], min_gap=0.05, per_prompt=3)
    assert [p.rejected for p in several] == ["no", "wrap it"]
    with pytest.raises(ValueError, match="2 score lists for 3 pairs"):
        ranked_preferences(pairs, candidates, scores[:2], min_gap=0.0)
    with pytest.raises(ValueError, match="at least 2 replies"):
        ranked_preferences(pairs[:1], [["only"]], [[0.5]], min_gap=0.0)


def test_drop_identical_counts():
    prefs = [PreferencePair("p", "yes", "no", "s"), PreferencePair("p", "same ", " same", "s"),
             PreferencePair("p", "a", "a", "s")]
    kept, dropped = drop_identical(prefs)
    assert kept == prefs[:1] and dropped == 2


def test_read_trl_jsonl_standard_and_conversational(tmp_path: Path):
    lines = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    prefs, bad = read_trl_jsonl(tmp_path / "t.jsonl")
    assert prefs == [
        PreferencePair("Capital of France?", "Paris.", "Lyon.", "t.jsonl#L1"),
        PreferencePair([{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"}],
                       "4", "5", "t.jsonl#L2"),
    ]
    assert bad.read == 2 and bad.total == 0


@pytest.mark.parametrize("record,reason,match", [
    ({"prompt": "q", "chosen": "a"}, "missing_field", "missing field 'rejected'"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "empty_reply", "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "wrong_type", "field 'rejected' must be a string"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical_replies", "are the same reply"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "bad_chat", "'chosen' must be a string or a list of one assistant"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "bad_chat", "prompt must end with a user turn"),
])
def test_read_trl_drops_and_counts_unusable_records(tmp_path: Path, record, reason, match):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    (tmp_path / "t.jsonl").write_text(f"{good}\n{json.dumps(record)}\n{good}\n")
    prefs, bad = read_trl_jsonl(tmp_path / "t.jsonl")
    assert [p.source for p in prefs] == ["t.jsonl#L1", "t.jsonl#L3"]
    assert bad.read == 3 and dict(bad.dropped) == {reason: 1} and bad.where == {reason: ["t.jsonl:2"]}
    assert bad.first[reason].startswith(f"{tmp_path}/t.jsonl:2: ") and match in bad.first[reason]


def test_read_trl_malformed_json_fails_naming_file_and_line(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", \n')
    with pytest.raises(CorpusFormatError, match=r"t\.jsonl:2: invalid JSON"):
        read_trl_jsonl(tmp_path / "t.jsonl")


HH_PROMPT = "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers.\n\nHuman: Another one?\n\nAssistant:"


def test_read_hh_rlhf_jsonl(tmp_path: Path):
    record = {"chosen": HH_PROMPT + " How about Mittens?", "rejected": HH_PROMPT + " No."}
    (tmp_path / "hh.jsonl").write_text(json.dumps(record) + "\n")
    assert read_hh_rlhf_jsonl(tmp_path / "hh.jsonl")[0] == [
        PreferencePair(HH_PROMPT, "How about Mittens?", "No.", "hh.jsonl#L1")]


@pytest.mark.parametrize("record,reason,match", [
    ({"chosen": HH_PROMPT + " Yes."}, "missing_field", "missing field 'rejected'"),
    ({"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + "  "}, "empty_reply",
     "'rejected': the final assistant reply is empty"),
    ({"chosen": "\n\nHuman: hi", "rejected": HH_PROMPT + " No."}, "bad_chat", "'chosen' has no 'Assistant:' turn"),
    ({"chosen": HH_PROMPT + " Yes.", "rejected": "\n\nHuman: other\n\nAssistant: No."}, "different_prefix",
     "differ before their final assistant reply"),
    ({"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + " Yes. "}, "identical_replies", "are the same reply"),
])
def test_read_hh_rlhf_drops_and_counts_unusable_records(tmp_path: Path, record, reason, match):
    good = json.dumps({"chosen": HH_PROMPT + " A.", "rejected": HH_PROMPT + " B."})
    (tmp_path / "hh.jsonl").write_text(f"{good}\n\n{json.dumps(record)}\n")
    prefs, bad = read_hh_rlhf_jsonl(tmp_path / "hh.jsonl")
    assert [p.source for p in prefs] == ["hh.jsonl#L1"]
    assert bad.read == 2 and dict(bad.dropped) == {reason: 1} and bad.where == {reason: ["hh.jsonl:3"]}
    assert bad.first[reason].startswith(f"{tmp_path}/hh.jsonl:3: ") and match in bad.first[reason]
