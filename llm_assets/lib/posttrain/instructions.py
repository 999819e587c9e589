r"""Instruction pairs for supervised fine-tuning: derived from the corpus's Python sources, or read
from user files.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.instructions import derive_pairs, read_alpaca, read_chat_jsonl, to_messages
    >>> source = ("def area(width, height=1):\n    '''Return the area of a rectangle.\n\n    Details.\n    '''\n"
    ...           "class Box:\n    '''A box that holds things.'''\n    def fill(self, item):\n"
    ...           "        '''Put an item in the box.'''\ndef _private():\n    '''Not public.'''\n")
    >>> pairs = derive_pairs([("stdlib/shapes.py", source)])   # (doc_id, text), e.g. rows of read_split
    >>> [(p.qualname, p.output) for p in pairs]
    [('area', 'Return the area of a rectangle.'), ('Box', 'A box that holds things.'), ('Box.fill', 'Put an item in the box.')]
    >>> to_messages(pairs[0])                              # [user, assistant] for a chat template
    [{'role': 'user', 'content': 'Explain what the Python function `shapes.area(width, height=1)` does.'}, {'role': 'assistant', 'content': 'Return the area of a rectangle.'}]
    >>> sft = Path(tempfile.mkdtemp())                     # data/sft/ in a project
    >>> _ = (sft / "alpaca.json").write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]))
    >>> pairs, bad = read_alpaca(sft / "alpaca.json")     # a JSON list or JSONL
    >>> [(p.instruction, p.output, p.source_doc_id) for p in pairs], bad.total
    ([('Add 2 and 3.', '5', 'alpaca.json#L1')], 0)
    >>> chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    >>> _ = (sft / "chat.jsonl").write_text(json.dumps({"messages": chat}) + '\n{"messages": [{"role": "user"}]}\n')
    >>> chats, bad = read_chat_jsonl(sft / "chat.jsonl")  # {"messages": [{role, content}, ...]} per line
    >>> chats == [(chat, "chat.jsonl#L1")], bad.where, bad.first["missing_field"][-51:]
    (True, {'missing_field': ['chat.jsonl:2: message 0']}, "message 0: missing field 'content' (keys: ['role'])")

Derived pairs (`task` "docstring"): for every public, documented function, method and class of a
Python module, the instruction asks what the signature does and the response is the docstring's first
paragraph. Any other text of the user's (not the embedded stdlib's docs) gives prose pairs,
continuations and section openings taken from the text itself (prose_tasks.py), so a corpus with no
Python still has post-training data. The caller derives train and validation pairs separately, from
the train and validation splits of the deduplicated shards: a validation pair then always comes
from a document the model never saw in pretraining, so the split stays leak-free (see `dedup.py`).

User files: a record that parses but cannot be used (a missing, null, mistyped or empty field, a
chat without a user turn or a final reply) is skipped and counted in the `BadRecords` the reader
returns, by reason and `file:line` (bad_records.py; posttrain_data.py judges the share). Malformed
JSON raises `CorpusFormatError` naming the file and line (for a JSON list: the item index and the
line it starts on).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_assets.lib.data.bad_records import BadRecord, BadRecords, read_records
from llm_assets.lib.data.corpus import CorpusFormatError, parse_json_object

MIN_RESPONSE_CHARS = 20  # shorter docstrings ("Return x.") teach nothing
MAX_RESPONSE_CHARS = 600  # longer first paragraphs are cut at a sentence boundary
CHAT_ROLES = ("system", "user", "assistant")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_WS = re.compile(r"\s*")
# The embedded default corpus (corpus.py) is a code corpus: its text files (pydoc topics, mostly
# grammar rules and tables; the licence; test data) give no prose tasks, so the demo's datasets stay
# the ones its settings were measured on.
EMBEDDED_PREFIXES = ("stdlib/", "stdlib-doc/")


@dataclass(frozen=True)
class InstructionPair:
    instruction: str
    input: str  # optional context appended to the instruction ("" when none)
    output: str
    source_doc_id: str  # the document (derived) or "file#Lline" (user file)
    qualname: str = ""  # "JSONDecoder.decode" for derived pairs, "" for user pairs
    module: str = ""  # "json.decoder" for derived pairs (prose: the doc id), "" for user pairs
    task: str = ""  # the derivation: "docstring", or prose_tasks.py's "continuation" / "section"; "" for user pairs


def module_name(doc_id: str) -> str:
    """'stdlib/json/decoder.py' -> 'json.decoder'; 'stdlib/json/__init__.py' -> 'json'; a document
    of a user file named by its "path", 'incoming/<batch>#L3:pkg/mod.py' -> 'pkg.mod'."""
    if "#" in doc_id:
        parts = doc_id.partition("#")[2].partition(":")[2].removesuffix(".py").split("/")
    else:
        parts = doc_id.removesuffix(".py").split("/")[1:]  # drop the namespace ("stdlib", "raw")
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _first_paragraph(doc: str) -> str:
    """The docstring's first paragraph (plus the next when it ends with ':', which introduces a
    list), cut to whole sentences within MAX_RESPONSE_CHARS; "" when it cannot be cut cleanly."""
    paras = [p.strip() for p in doc.strip().split("\n\n")]
    text = paras[0]
    for nxt in paras[1:]:
        if not text.endswith(":") or len(text) + 2 + len(nxt) > MAX_RESPONSE_CHARS:
            break
        text = f"{text}\n\n{nxt}"
    if text.endswith(":"):
        return ""  # a dangling introduction teaches the model to stop mid-thought
    if len(text) <= MAX_RESPONSE_CHARS:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= MAX_RESPONSE_CHARS]
    return text[: ends[-1]] if ends else ""


def _signature(node: ast.AST) -> str:
    """Argument list as written; for a class, its own __init__'s arguments without `self`."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"({ast.unparse(node.args)})"
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None or not (init.args.posonlyargs or init.args.args):
        return ""
    args = copy.copy(init.args)
    if args.posonlyargs:
        args.posonlyargs = args.posonlyargs[1:]
    else:
        args.args = args.args[1:]
    n_positional = len(args.posonlyargs) + len(args.args)
    # defaults belong to the last positional arguments; drop self's if it had one
    if len(args.defaults) > n_positional:
        args.defaults = args.defaults[len(args.defaults) - n_positional :]
    return f"({ast.unparse(args)})"


def _definitions(body: list[ast.stmt], prefix: str, in_class: bool) -> Iterator[tuple[str, str, ast.AST]]:
    """(qualname, kind, node) for public definitions, looking through module- and class-level
    if/try/with blocks (platform-specific definitions live there) but never into function bodies."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_"):
                continue
            qualname = f"{prefix}{node.name}"
            if isinstance(node, ast.ClassDef):
                yield qualname, "class", node
                yield from _definitions(node.body, f"{qualname}.", in_class=True)
            else:
                kind = "method" if in_class else "function"
                yield qualname, f"async {kind}" if isinstance(node, ast.AsyncFunctionDef) else kind, node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for block in blocks:
                yield from _definitions(block, prefix, in_class)


def pairs_from_source(doc_id: str, text: str) -> list[InstructionPair]:
    """Pairs of one Python module in source order; raises SyntaxError/ValueError if it does not parse."""
    module = module_name(doc_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old test modules
        tree = ast.parse(text)
    pairs, seen = [], set()
    for qualname, kind, node in _definitions(tree.body, "", in_class=False):
        doc = ast.get_docstring(node, clean=True)  # clean=True is inspect.cleandoc
        if qualname in seen or not doc:
            continue
        response = _first_paragraph(doc)
        if len(response) < MIN_RESPONSE_CHARS:
            continue
        seen.add(qualname)  # first documented definition wins (if/else variants, property setters)
        name = f"{module}.{qualname}" if module else qualname
        instruction = f"Explain what the Python {kind} `{name}{_signature(node)}` does."
        pairs.append(InstructionPair(instruction, "", response, doc_id, qualname, module, "docstring"))
    return pairs


_DERIVED: dict[bytes, list[InstructionPair]] = {}  # see derive_pairs
_DERIVED_KEPT = 4  # train and validation, of the shards and of the incoming batches


def derive_pairs(docs: Iterable[tuple[str, str]], max_pairs: int = 0) -> list[InstructionPair]:
    """Pairs from (doc_id, text) documents, ordered by doc_id then position in the document: docstring
    pairs from Python sources (`.py`; those that do not parse are skipped), prose pairs
    (prose_tasks.py) from any other text but the embedded stdlib's. `max_pairs` > 0 keeps that many,
    spread evenly over the ordered list so every part of the corpus is sampled.

    Parsing is the cost (15 s of `ast` for the demo's 32 MB corpus, against 0.1 s for a digest of it).
    The pairs of the last four document sets stay in the process, keyed by that digest, so that
    sft_dataset and preference_dataset parse a corpus once where one process runs both (as
    `llm-assets materialize` does)."""
    docs = sorted(docs)
    digest = hashlib.blake2b(digest_size=20)
    for doc_id, text in docs:
        for part in (doc_id, text):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    key = digest.digest()
    if key not in _DERIVED:
        while len(_DERIVED) >= _DERIVED_KEPT:
            del _DERIVED[next(iter(_DERIVED))]  # the oldest
        _DERIVED[key] = _derive_all(docs)
    pairs = _DERIVED[key]
    if 0 < max_pairs < len(pairs):
        return [pairs[i * len(pairs) // max_pairs] for i in range(max_pairs)]
    return list(pairs)  # a copy: the kept list must not change under a caller


def _derive_all(docs: list[tuple[str, str]]) -> list[InstructionPair]:
    from llm_assets.lib.posttrain.prose_tasks import pairs_from_text  # at call time: it imports InstructionPair from here

    pairs: list[InstructionPair] = []
    for doc_id, text in docs:
        if doc_id.endswith(".py"):
            try:
                pairs.extend(pairs_from_source(doc_id, text))
            except (SyntaxError, ValueError):  # e.g. test/badsyntax_*.py, source with NUL bytes
                continue
        elif not doc_id.startswith(EMBEDDED_PREFIXES):
            pairs.extend(pairs_from_text(doc_id, text))
    return pairs


def to_messages(pair: InstructionPair) -> list[dict[str, str]]:
    content = f"{pair.instruction}\n\n{pair.input}" if pair.input else pair.instruction
    return [{"role": "user", "content": content}, {"role": "assistant", "content": pair.output}]


# --- user files -----------------------------------------------------------------------------


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark on line 1
            except UnicodeDecodeError as e:
                raise CorpusFormatError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from e
            if not line.strip():
                continue
            yield lineno, parse_json_object(path, lineno, line)


def iter_json_list(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(item index, line it starts on, object) for each item of a file holding one JSON list of
    objects. Items are decoded one at a time so an error can name the line the item starts on."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise CorpusFormatError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from e
    decoder, line, pos = json.JSONDecoder(), 1, 0

    def line_at(i: int) -> int:
        nonlocal line, pos
        line, pos = line + text.count("\n", pos, i), i
        return line

    i = _WS.match(text).end()
    if text[i : i + 1] != "[":
        raise CorpusFormatError(f"{path}:{line_at(i)}: expected a JSON list of objects")
    i = _WS.match(text, i + 1).end()
    index = 0
    while text[i : i + 1] != "]":
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise CorpusFormatError(f"{path}:{e.lineno}: item {index}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(item, dict):
            got = type(item).__name__
            raise CorpusFormatError(f"{path}:{line_at(i)}: item {index}: expected a JSON object, got {got}")
        yield index, line_at(i), item
        i = _WS.match(text, end).end()
        if text[i : i + 1] == ",":
            i, index = _WS.match(text, i + 1).end(), index + 1
            if text[i : i + 1] == "]":
                raise CorpusFormatError(f"{path}:{line_at(i)}: trailing ',' before ']'")
        elif text[i : i + 1] != "]":
            raise CorpusFormatError(f"{path}:{line_at(i)}: expected ',' or ']' after item {index}")
    if text[i + 1 :].strip():
        raise CorpusFormatError(f"{path}:{line_at(i + 1)}: unexpected content after the JSON list")


def require_text(record: dict, field: str, where: str, nonempty: bool = True, optional: bool = False,
                 reply: bool = False) -> str:
    """record[field] as a string; `where` is the "file:line" prefix. A missing (or null), mistyped or
    empty (when `nonempty`) field raises BadRecord; an empty `reply` is reason empty_reply."""
    value = record.get(field)
    if value is None:
        if optional:
            return ""
        raise BadRecord("missing_field", where, f"missing field {field!r} (keys: {sorted(record)[:10]})"
                        if field not in record else f"field {field!r} is null")
    if not isinstance(value, str):
        raise BadRecord("wrong_type", where, f"field {field!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise BadRecord("empty_reply" if reply else "empty_field", where, f"field {field!r} is empty")
    return value


def _alpaca_pair(record: dict, where: str, source: str) -> InstructionPair:
    instruction = require_text(record, "instruction", where)
    input_ = require_text(record, "input", where, nonempty=False, optional=True)
    output = require_text(record, "output", where, reply=True)
    return InstructionPair(instruction, input_, output, source)


def read_alpaca(path: Path) -> tuple[list[InstructionPair], BadRecords]:
    """(pairs, records dropped) of Alpaca records (`instruction`, optional `input`, `output`) from a
    `.json` list or `.jsonl`."""
    path = Path(path)
    if path.suffix == ".json":
        records = ((f"{path}:{lineno}: item {k}", (lineno, r)) for k, lineno, r in iter_json_list(path))
    elif path.suffix == ".jsonl":
        records = ((f"{path}:{lineno}", (lineno, r)) for lineno, r in iter_jsonl(path))
    else:
        raise CorpusFormatError(f"{path}: unsupported Alpaca file type {path.suffix!r}; use .json or .jsonl")
    bad = BadRecords()
    pairs = list(read_records(records, lambda line, where: _alpaca_pair(line[1], where, f"{path.name}#L{line[0]}"), bad))
    return pairs, bad


def validate_messages(messages: object, where: str) -> list[dict[str, str]]:
    """A chat as [{role, content}] with known roles, at least one user turn, and a non-empty
    assistant turn last (the turn the model is trained to produce); BadRecord otherwise."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad_chat", where, "'messages' must be a non-empty list of {role, content} objects")
    chat = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord("bad_chat", where, f"message {k} must be an object, got {type(m).__name__}")
        role = require_text(m, "role", f"{where}: message {k}")
        if role not in CHAT_ROLES:
            raise BadRecord("bad_chat", where, f"message {k}: unknown role {role!r}; use one of {CHAT_ROLES}")
        content = require_text(m, "content", f"{where}: message {k}", nonempty=False)
        chat.append({"role": role, "content": content})
    if chat[-1]["role"] != "assistant":
        raise BadRecord("bad_chat", where, f"the last message must be an assistant turn, got {chat[-1]['role']!r}")
    if not chat[-1]["content"].strip():
        raise BadRecord("empty_reply", where, "the final assistant turn is empty")
    if not any(m["role"] == "user" for m in chat):
        raise BadRecord("bad_chat", where, "no user turn")
    return chat


def read_chat_jsonl(path: Path) -> tuple[list[tuple[list[dict[str, str]], str]], BadRecords]:
    """((chat, "file#Lline") per usable line, records dropped) from JSONL lines
    `{"messages": [{"role": ..., "content": ...}, ...]}`."""
    def chat(line: tuple[int, dict], where: str) -> tuple[list[dict[str, str]], str]:
        lineno, record = line
        if "messages" not in record:
            raise BadRecord("missing_field", where, f"missing field 'messages' (keys: {sorted(record)[:10]})")
        return validate_messages(record["messages"], where), f"{Path(path).name}#L{lineno}"

    bad = BadRecords()
    chats = list(read_records(((f"{path}:{n}", (n, r)) for n, r in iter_jsonl(path)), chat, bad))
    return chats, bad
