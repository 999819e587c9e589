r"""Preference pairs (prompt, chosen, rejected) for preference tuning (DPO and friends): built from
instruction pairs and a model's own replies (on-policy), derived from instruction pairs alone (hard
negatives), or read from user files.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.instructions import InstructionPair
    >>> from llm_assets.lib.posttrain.preferences import (derive_preferences, drop_identical, on_policy_preferences,
    ...                                                   ranked_preferences,
    ...                                                   prompt_messages, read_hh_rlhf_jsonl, read_trl_jsonl)
    >>> pairs = [InstructionPair(f"Explain `json.{name}`.", "", answer, "stdlib/json.py", name, "json")
    ...          for name, answer in [("loads", "Parse a JSON string."), ("dumps", "Serialize to JSON."),
    ...                               ("lonely", "Parse a JSON string.")]]
    >>> replies = ["Parse the the the", " Serialize to JSON. ", ""]   # the model's greedy replies (generation.py)
    >>> prefs, dropped = on_policy_preferences(pairs, replies)        # rejected: the model's own reply
    >>> [(p.chosen, p.rejected, p.negative) for p in prefs], dropped  # dumps: the model already answers it
    ([('Parse a JSON string.', 'Parse the the the', 'on_policy'), ('Parse a JSON string.', '', 'on_policy')], 1)
    >>> candidates = [["Parse JSON text.", "the the the", "Parse a file."]]   # greedy + samples (generation.py)
    >>> scores = [[0.8, 0.0, 0.5]]                         # ROUGE-L of each against the docstring
    >>> prefs, none = ranked_preferences(pairs[:1], candidates, scores, min_gap=0.05)   # best vs worst
    >>> [(p.chosen, p.rejected, p.negative) for p in prefs], none
    ([('Parse JSON text.', 'the the the', 'ranked')], 0)
    >>> prefs, skipped = derive_preferences(pairs, seed=0)   # rejected: another definition's answer
    >>> [(p.chosen, p.rejected, p.negative) for p in prefs], skipped
    ([('Parse a JSON string.', 'Serialize to JSON.', 'module'), ('Serialize to JSON.', 'Parse a JSON string.', 'module'), ('Parse a JSON string.', 'Serialize to JSON.', 'module')], 0)
    >>> prefs_dir = Path(tempfile.mkdtemp())                 # data/preferences/ in a project
    >>> _ = (prefs_dir / "trl.jsonl").write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    >>> read_trl_jsonl(prefs_dir / "trl.jsonl")[0]         # TRL: prompt / chosen / rejected
    [PreferencePair(prompt='2+2?', chosen='4', rejected='5', source='trl.jsonl#L1', negative='')]
    >>> dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"
    >>> records = [{"chosen": dialogue + " 4", "rejected": dialogue + " 5"},
    ...            {"chosen": dialogue + " 4", "rejected": dialogue + " 4 "},      # no preference to learn
    ...            {"chosen": dialogue + " 4", "rejected": dialogue + ""},         # no reply
    ...            {"chosen": dialogue + " 4", "rejected": "\n\nHuman: 3+3?\n\nAssistant: 6"}]
    >>> _ = (prefs_dir / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    >>> hh, bad = read_hh_rlhf_jsonl(prefs_dir / "hh.jsonl")    # Anthropic HH-RLHF dialogues
    >>> prompt_messages(hh[0].prompt)                       # as chat turns, ending in the user's
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': '2+2?'}]
    >>> bad.read, bad.where                                 # unusable records: dropped, counted, located
    (4, {'identical_replies': ['hh.jsonl:2'], 'empty_reply': ['hh.jsonl:3'], 'different_prefix': ['hh.jsonl:4']})

Ranked pairs (the default of preference_dataset): both replies are the instruction-tuned model's
own, to the same prompt (its greedy reply and a few samples), scored against the docstring (ROUGE-L,
generation.py); chosen is the best, rejected the worst, and prompts whose replies all score alike
give no pair. The policy is pushed from what it does badly towards what it already does well, on
text it actually produces: on-policy pairs labelled by agreement with a reference answer, as in
iterative reasoning preference optimization (Pang et al., 2024) and RSO's ranked samples (Liu et
al., 2024). On the demo (128 held-out prompts) DPO on these pairs kept the aligned model's ROUGE-L
at 0.94x the instruction-tuned model's, where on-policy pairs (docstring over the greedy reply)
cut it to 0.81x.

On-policy pairs: the prompt is an instruction, chosen its
docstring answer, rejected the instruction-tuned model's own greedy reply to the same prompt, as in
self-play fine-tuning (SPIN). DPO then pushes the model away from what it actually does (loops,
wrong stops) towards the reference; another function's docstring is a reply the model would rarely
produce, and on the demo DPO learned nothing from such pairs. A reply equal to the reference (after strip) is no preference and is dropped and
counted; an empty reply is kept (stopping at once is a habit worth unlearning).

Hard-negative pairs: the prompt is an instruction, chosen is its own docstring answer and rejected is the
docstring of a different definition. Negatives are hard where possible: from the same module
(`JSONDecoder.decode` vs `JSONDecoder.raw_decode` read alike), else the same top-level package, else
anywhere. A pair whose only candidates have the same text as its answer is skipped and counted.
Build train and validation preferences from the train and validation instruction pairs separately,
so negatives never cross the split.

User files: a record that parses but cannot be used (an empty or missing reply, identical replies,
HH dialogues that differ before the final reply) is skipped and counted in the `BadRecords` the
reader returns, by reason and `file:line` (posttrain_data.py judges the share). Malformed JSON
raises `CorpusFormatError` naming the file and line. `drop_identical` does the same for derived pairs.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llm_assets.lib.data.bad_records import BadRecord, BadRecords, read_records
from llm_assets.lib.posttrain.instructions import (InstructionPair, iter_jsonl, require_text, to_messages,
                                                   validate_messages)

HH_ASSISTANT = "\n\nAssistant:"  # HH-RLHF turn marker; the last one opens the compared reply
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    # A string, or (TRL conversational form) a list of {role, content} messages ending in a user turn.
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    source: str  # "doc_id::qualname" (derived) or "file#Lline" (user file)
    # where rejected came from: "on_policy" (the model's reply), "module", "package" or "any" (another
    # definition's docstring, hard negatives); "" for user files
    negative: str = ""


def _pick(rng: random.Random, candidates: list[int], me: int, answers: list[str]) -> int | None:
    """A random candidate other than `me` whose answer differs from mine; None if there is none.
    Scans cyclically from a random start: O(1) in the usual case, never loops forever."""
    if not candidates:
        return None
    start = rng.randrange(len(candidates))
    for k in range(len(candidates)):
        j = candidates[(start + k) % len(candidates)]
        if j != me and answers[j] != answers[me]:
            return j
    return None


def derive_preferences(pairs: list[InstructionPair], seed: int = 0) -> tuple[list[PreferencePair], int]:
    """(preference pairs in the order of `pairs`, pairs skipped for lack of a distinct negative)."""
    answers = [p.output.strip() for p in pairs]
    by_module: dict[str, list[int]] = defaultdict(list)
    by_package: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_module[p.module].append(i)
        by_package[p.module.split(".")[0]].append(i)
    everyone = list(range(len(pairs)))
    out, skipped = [], 0
    for i, p in enumerate(pairs):
        # Seeded per pair (str seeds are hashed with sha512, not PYTHONHASHSEED), so one pair's
        # negative does not change when other pairs are added or removed.
        rng = random.Random(f"{seed}:{p.source_doc_id}:{p.qualname}:{p.instruction}")
        for tier, candidates in (("module", by_module[p.module]),
                                 ("package", by_package[p.module.split(".")[0]]), ("any", everyone)):
            j = _pick(rng, candidates, i, answers)
            if j is not None:
                break
        if j is None:
            skipped += 1
            continue
        out.append(PreferencePair(p.instruction, p.output, pairs[j].output, f"{p.source_doc_id}::{p.qualname}", tier))
    return out, skipped


def on_policy_preferences(pairs: list[InstructionPair], replies: list[str]) -> tuple[list[PreferencePair], int]:
    """(pairs with rejected = the model's reply to the same instruction, in the order of `pairs`;
    the number dropped because the reply equals the reference after strip). `replies[i]` answers
    `pairs[i]`; empty replies are kept."""
    if len(replies) != len(pairs):
        raise ValueError(f"replies: {len(replies)} replies for {len(pairs)} instruction pairs")
    out = [PreferencePair(to_messages(p)[0]["content"], p.output, reply.strip(), f"{p.source_doc_id}::{p.qualname}",
                          "on_policy")
           for p, reply in zip(pairs, replies) if reply.strip() != p.output.strip()]
    return out, len(pairs) - len(out)


def ranked_preferences(pairs: list[InstructionPair], candidates: list[list[str]], scores: list[list[float]],
                       min_gap: float, per_prompt: int = 1) -> tuple[list[PreferencePair], int]:
    """(pairs between the model's own replies to each instruction, in the order of `pairs`; the
    number of instructions that gave none). chosen is the best-scored reply, rejected each distinct
    reply scoring at least `min_gap` lower, worst first, at most `per_prompt` of them.
    `candidates[i]` are replies to `pairs[i]`, `scores[i]` their scores against its reference."""
    if not len(pairs) == len(candidates) == len(scores):
        raise ValueError(f"candidates: {len(candidates)} reply lists and {len(scores)} score lists for {len(pairs)} pairs")
    out, none = [], 0
    for p, replies, marks in zip(pairs, candidates, scores):
        if len(replies) != len(marks) or len(replies) < 2:
            raise ValueError(f"{p.source_doc_id}::{p.qualname}: needs at least 2 replies, each scored")
        order = sorted(range(len(replies)), key=lambda i: -marks[i])  # best first; ties keep reply order
        chosen, rejected = replies[order[0]].strip(), []
        for i in reversed(order[1:]):  # worst first
            text = replies[i].strip()
            if marks[order[0]] - marks[i] >= min_gap and text != chosen and text not in rejected:
                rejected.append(text)
        none += not rejected
        out += [PreferencePair(to_messages(p)[0]["content"], chosen, r, f"{p.source_doc_id}::{p.qualname}", "ranked")
                for r in rejected[:per_prompt]]
    return out, none


def drop_identical(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """(pairs whose chosen and rejected differ after strip, number dropped): an identical pair has
    zero preference margin and only adds noise to the loss."""
    kept = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
    return kept, len(pairs) - len(kept)


def _reply(value: object, field: str, where: str) -> str:
    """A TRL completion: a string, or a one-message list holding the assistant reply."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise BadRecord("bad_chat", where, f"field {field!r} must be a string or a list of one assistant message")
        return require_text(value[0], "content", f"{where}: {field}", reply=True)
    return require_text({field: value}, field, where, reply=True)


def _distinct(chosen: str, rejected: str, where: str) -> None:
    """Identical replies (after strip) have zero preference margin: the record teaches nothing."""
    if chosen.strip() == rejected.strip():
        raise BadRecord("identical_replies", where, "'chosen' and 'rejected' are the same reply")


def _trl_pair(record: dict, where: str, source: str) -> PreferencePair:
    for field in ("prompt", "chosen", "rejected"):
        if field not in record:
            raise BadRecord("missing_field", where, f"missing field {field!r} (keys: {sorted(record)[:10]})")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        # validate as a chat by appending a placeholder reply, then take it off again
        prompt = validate_messages(prompt + [{"role": "assistant", "content": "-"}], f"{where}: prompt")[:-1]
        if prompt[-1]["role"] != "user":
            raise BadRecord("bad_chat", where, "prompt must end with a user turn")
    else:
        prompt = require_text(record, "prompt", where)
    chosen, rejected = _reply(record["chosen"], "chosen", where), _reply(record["rejected"], "rejected", where)
    _distinct(chosen, rejected, where)
    return PreferencePair(prompt, chosen, rejected, source)


def read_trl_jsonl(path: Path) -> tuple[list[PreferencePair], BadRecords]:
    """(pairs, records dropped) of TRL preference records: `prompt`, `chosen`, `rejected` as
    strings, or in the conversational form (prompt a list of messages, chosen/rejected one assistant
    message each)."""
    bad = BadRecords()
    records = ((f"{path}:{n}", (n, r)) for n, r in iter_jsonl(path))
    pairs = list(read_records(records, lambda line, where: _trl_pair(line[1], where, f"{Path(path).name}#L{line[0]}"), bad))
    return pairs, bad


def _split_hh(dialogue: str, field: str, where: str) -> tuple[str, str]:
    """(prompt up to and including the last '\\n\\nAssistant:', the final reply stripped)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord("bad_chat", where, f"field {field!r} has no {HH_ASSISTANT.strip()!r} turn")
    prompt, reply = dialogue[: cut + len(HH_ASSISTANT)], dialogue[cut + len(HH_ASSISTANT):].strip()
    if not reply:
        raise BadRecord("empty_reply", where, f"field {field!r}: the final assistant reply is empty")
    return prompt, reply


def _hh_pair(record: dict, where: str, source: str) -> PreferencePair:
    prompt, chosen = _split_hh(require_text(record, "chosen", where), "chosen", where)
    other, rejected = _split_hh(require_text(record, "rejected", where), "rejected", where)
    if other != prompt:
        raise BadRecord("different_prefix", where, "'chosen' and 'rejected' differ before their final assistant reply")
    _distinct(chosen, rejected, where)
    return PreferencePair(prompt, chosen, rejected, source)


def read_hh_rlhf_jsonl(path: Path) -> tuple[list[PreferencePair], BadRecords]:
    """(pairs, records dropped) of Anthropic HH-RLHF records: `chosen` and `rejected` are whole
    dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...") that share everything but the final reply."""
    bad = BadRecords()
    records = ((f"{path}:{n}", (n, r)) for n, r in iter_jsonl(path))
    pairs = list(read_records(records, lambda line, where: _hh_pair(line[1], where, f"{Path(path).name}#L{line[0]}"), bad))
    return pairs, bad


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A preference prompt as chat messages ending in a user turn: TRL conversational prompts as
    they are, HH-RLHF dialogue text split into its Human/Assistant turns, any other string as one
    user message."""
    if isinstance(prompt, list):
        return prompt
    if prompt.endswith(HH_ASSISTANT) and "\n\nHuman:" in prompt:
        parts = _HH_TURN.split(prompt[: -len(HH_ASSISTANT)])
        # parts = [text before the first turn, role, content, role, content, ...]
        turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                 for role, content in zip(parts[1::2], parts[2::2])]
        if turns and turns[-1]["role"] == "user":
            return turns
    return [{"role": "user", "content": prompt}]
