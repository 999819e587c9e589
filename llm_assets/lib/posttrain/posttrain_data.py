r"""The two post-training datasets as Parquet: instruction chats (SFT) and preference pairs (DPO),
assembled from the corpus-derived pairs and the user's files.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.posttrain_data import (chat_row, read_chats, read_preference_file,
    ...     read_preferences, read_sft_file, split_file, user_prompts, write_chats, write_preferences)
    >>> user, dataset_dir = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> _ = (user / "alpaca.json").write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]))
    >>> chats, bad = read_sft_file(user / "alpaca.json")    # [(messages, source)], Alpaca or chat
    >>> chats, bad.total
    ([([{'role': 'user', 'content': 'Add 2 and 3.'}, {'role': 'assistant', 'content': '5'}], 'alpaca.json#L1')], 0)
    >>> write_chats(dataset_dir, "train", [chat_row(messages, source, "user") for messages, source in chats])
    >>> split_file(dataset_dir, "train").name, user_prompts(read_chats(dataset_dir, "train"))
    ('train.parquet', ['Add 2 and 3.'])
    >>> _ = (user / "hh.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
    ...                                                "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}) + "\n")
    >>> pairs, bad = read_preference_file(user / "hh.jsonl")  # TRL or HH-RLHF records, told by the keys
    >>> write_preferences(dataset_dir, "validation", pairs)
    >>> read_preferences(dataset_dir, "validation")         # the prompt stored as messages
    [PreferencePair(prompt=[{'role': 'user', 'content': '2+2?'}], chosen='4', rejected='5', source='hh.jsonl#L1', negative='')]

Both datasets are one Parquet file per split, `<dataset_dir>/<split>.parquet` (`split_file`), written
and read only by the functions above.

User files carry no split, so each record goes to validation when a stable hash of its content falls
under the validation fraction: the same record lands in the same split on every run and machine,
and adding records never moves old ones.

The format of a user file is told by its first record: `messages` means chat JSONL, `instruction`
Alpaca; `prompt` means TRL preferences, `chosen` alone HH-RLHF dialogues. A file that is neither
fails with its name and the keys it has.

Records that parse but cannot be used (an empty reply, identical replies, HH dialogues that differ
before the final reply, a missing field) are dropped and counted per reason (`BadRecords`); a file
fails, with the counts and the first error of each reason, only when they are more than
`max_bad_share` of its records, or all of them:

    >>> lines = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(30)] + [{"instruction": "Say it."}]
    >>> _ = (user / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    >>> chats, bad = read_sft_file(user / "many.jsonl")     # 1 of 31 records: 3% <= 5%
    >>> len(chats), bad.rows()
    (30, [('missing_field', 1, 'many.jsonl:31')])
    >>> read_sft_file(user / "many.jsonl", max_bad_share=0.01)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    llm_assets.lib.data.bad_records.TooManyBadRecords: .../many.jsonl: 1 of 31 records unusable (3.2% > max_bad_record_share 1.0%): missing_field 1 (.../many.jsonl:31: missing field 'output' (keys: ['instruction']))
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm_assets.lib.data.bad_records import MAX_BAD_RECORD_SHARE, BadRecords
from llm_assets.lib.data.corpus import CorpusFormatError
from llm_assets.lib.posttrain.instructions import (InstructionPair, iter_json_list, iter_jsonl, read_alpaca, read_chat_jsonl,
                                         to_messages)
from llm_assets.lib.posttrain.preferences import PreferencePair, prompt_messages, read_hh_rlhf_jsonl, read_trl_jsonl

USER_SUFFIXES = (".json", ".jsonl")


def user_files(directory: Path) -> list[Path]:
    """JSON/JSONL files under `directory` (recursively, sorted); [] when it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in USER_SUFFIXES)


def first_record(path: Path) -> dict:
    records = (r for _, _, r in iter_json_list(path)) if path.suffix == ".json" else (r for _, r in iter_jsonl(path))
    first = next(records, None)
    if first is None:
        raise CorpusFormatError(f"{path}: no records")
    return first


def read_sft_file(path: Path, max_bad_share: float = MAX_BAD_RECORD_SHARE) -> tuple[list[tuple[list[dict], str]], BadRecords]:
    """((messages, source) per usable record, records dropped) of an Alpaca (.json/.jsonl) or chat
    (.jsonl) file; TooManyBadRecords when more than `max_bad_share` of them are unusable."""
    keys = first_record(path)
    if "messages" in keys:
        if path.suffix != ".jsonl":
            raise CorpusFormatError(f"{path}: chat records must be JSONL (one {{\"messages\": [...]}} per line)")
        chats, bad = read_chat_jsonl(path)
    elif "instruction" in keys:
        pairs, bad = read_alpaca(path)
        chats = [(to_messages(p), p.source_doc_id) for p in pairs]
    else:
        raise CorpusFormatError(f"{path}:1: neither Alpaca (instruction/input/output) nor chat (messages) records; "
                                f"keys: {sorted(keys)[:10]}")
    bad.check(max_bad_share, str(path))
    return chats, bad


def read_preference_file(path: Path, max_bad_share: float = MAX_BAD_RECORD_SHARE) -> tuple[list[PreferencePair], BadRecords]:
    """(pairs, records dropped) of a TRL or HH-RLHF file; TooManyBadRecords when more than
    `max_bad_share` of its records are unusable."""
    if path.suffix != ".jsonl":
        raise CorpusFormatError(f"{path}: preference files must be JSONL")
    keys = first_record(path)
    if "prompt" in keys:
        pairs, bad = read_trl_jsonl(path)
    elif "chosen" in keys:
        pairs, bad = read_hh_rlhf_jsonl(path)
    else:
        raise CorpusFormatError(f"{path}:1: neither TRL (prompt/chosen/rejected) nor HH-RLHF (chosen/rejected) "
                                f"records; keys: {sorted(keys)[:10]}")
    bad.check(max_bad_share, str(path))
    return pairs, bad


def held_out(content: object, fraction: float) -> bool:
    """Stable split of a user record by the hash of its content."""
    digest = hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --- Parquet ------------------------------------------------------------------------------------

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CHAT_SCHEMA = pa.schema([("messages", _MESSAGES), ("source", pa.string()), ("origin", pa.string()),
                         ("module", pa.string())])
PREFERENCE_SCHEMA = pa.schema([("prompt", _MESSAGES), ("chosen", pa.string()), ("rejected", pa.string()),
                               ("source", pa.string()), ("negative", pa.string())])


def chat_row(messages: list[dict], source: str, origin: str, module: str = "") -> dict:
    return {"messages": messages, "source": source, "origin": origin, "module": module}


def derived_chat_rows(pairs: list[InstructionPair]) -> list[dict]:
    return [chat_row(to_messages(p), f"{p.source_doc_id}::{p.qualname}",
                     "incoming" if p.source_doc_id.startswith("incoming/") else "corpus", p.module) for p in pairs]


def split_file(dataset_dir: Path, split: str) -> Path:
    """`<split>.parquet` of sft_dataset or preference_dataset."""
    return Path(dataset_dir) / f"{split}.parquet"


def write_chats(dataset_dir: Path, split: str, rows: list[dict]) -> None:
    """One split of sft_dataset: rows of `chat_row` (messages, source, origin, module)."""
    table = pa.Table.from_pylist(rows, schema=CHAT_SCHEMA)
    pq.write_table(table, split_file(dataset_dir, split))  # into a staging dir (atomic)


def read_chats(dataset_dir: Path, split: str) -> list[list[dict]]:
    """The chats (message lists) of one split of sft_dataset."""
    return pq.read_table(split_file(dataset_dir, split), columns=["messages"]).column("messages").to_pylist()


def read_sources(dataset_dir: Path, split: str) -> list[str]:
    """The `source` of each row of one split of sft_dataset or preference_dataset, in row order
    ("file#Lline" for user records): what metadata names an example by."""
    return pq.read_table(split_file(dataset_dir, split), columns=["source"]).column("source").to_pylist()


def user_prompts(chats: list[list[dict]]) -> list[str]:
    """The first user message of each chat: what a person would send the server."""
    return [next(m["content"] for m in chat if m["role"] == "user") for chat in chats]


def write_preferences(dataset_dir: Path, split: str, pairs: list[PreferencePair]) -> None:
    """One split of preference_dataset (the prompt stored as messages)."""
    rows = [{"prompt": prompt_messages(p.prompt), "chosen": p.chosen, "rejected": p.rejected,
             "source": p.source, "negative": p.negative} for p in pairs]
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), split_file(dataset_dir, split))


def read_preferences(dataset_dir: Path, split: str) -> list[PreferencePair]:
    """The pairs of one split of preference_dataset."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r["source"], r["negative"])
            for r in pq.read_table(split_file(dataset_dir, split)).to_pylist()]
