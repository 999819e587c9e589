r"""Instruction pairs from prose: for corpus text that is not Python, tasks made from the text itself,
whose reference reply is the text's own words.

    >>> from llm_assets.lib.posttrain.prose_tasks import pairs_from_text
    >>> text = ("# Tides\n\nThe moon pulls the sea toward it, so the water rises on the side of the earth "
    ...         "that faces the moon. The sun pulls as well, less strongly.\n\n## Spring tides\n\n"
    ...         "Twice a month the sun and the moon line up. Their pulls add, and the tides run highest.")
    >>> pairs = pairs_from_text("raw/tides.md", text)      # (doc_id, text), e.g. rows of read_split
    >>> [(p.qualname, p.output[:40]) for p in pairs]      # <task>@<offset of the reply in the text>
    [('section@9', 'The moon pulls the sea toward it, so the'), ('continuation@108', 'The sun pulls as well, less strongly.'), ('continuation@164', 'Twice a month the sun and the moon line '), ('section@164', 'Twice a month the sun and the moon line '), ('continuation@208', 'Their pulls add, and the tides run highe')]
    >>> print(pairs[1].instruction)
    Continue this text:
    <BLANKLINE>
    # Tides
    <BLANKLINE>
    The moon pulls the sea toward it, so the water rises on the side of the earth that faces the moon.
    >>> pairs[3].instruction, pairs[3].module, pairs[3].task
    ('Write the opening of the section "Spring tides" of "Tides".', 'raw/tides.md', 'section')

Two tasks (`InstructionPair.task`; `qualname` is `<task>@<offset of the reply in the document>`):
- `continuation`: "Continue this text:" and a passage -> the sentences that follow it. The cut is at
  a sentence start; the passage is the whole sentences before it, up to `PASSAGE_CHARS`, across
  paragraphs and headings; the reply is the whole sentences after it, up to `MAX_REPLY_CHARS`, and
  never past its paragraph's end.
- `section`: a Markdown heading followed by a paragraph -> that paragraph's first sentences (same
  rule), asked as 'Write the opening of the section "<heading>" of "<title>".'; the title is the
  document's first `# ` heading, left out when there is none or it is the heading itself.
At most `MAX_PAIRS_PER_TASK` of each per document, spread evenly over its candidates.

Why these two. The reply has to be the text's own words: no model is at hand to write answers, and
preference_dataset's ranked pairs score the model's replies against the reference by ROUGE-L, which
needs a reply the prompt pins down. A continuation is pretraining's objective asked as a request:
fine-tuning on it teaches the chat turn (answer in the reply, stop at a sentence's end) on what the
base model already knows, where summaries or questions would need answers no text in the corpus
holds. A section prompt uses the structure the author gave, and is a request a person makes ("write
the part about X"). A title task ("Give a title for: ...") was left out: headings are a few words,
below MIN_RESPONSE_CHARS, and ROUGE-L of a 3-word reply ranks replies by chance.

Split: the caller derives train and validation pairs from the train and validation documents
separately, as for docstring pairs, so all of a document's pairs sit on one side and held-out
prompts come from text pretraining never saw. Hard negatives (preferences.derive_preferences) group
by `module`, here the doc id: a prose pair's negative is another reply from the same document (a
fluent, on-topic sentence in the wrong place), else from an id with the same part before its first
'.' (other pieces or lines of the same file: `raw/book.txt#chars=...`, `raw/rows.jsonl#L3`), else any.

Sentence ends are `.`, `!`, `?` (with closing quotes or brackets) before whitespace, and `。！？`; an
abbreviation ("e.g. x") ends a sentence early, which makes a shorter pair, not a wrong one. A
paragraph's end ends its last sentence. Fenced code, indented code and tables are context for a
passage but never a reply.
"""

from __future__ import annotations

import bisect
import re

from llm_assets.lib.posttrain.instructions import MIN_RESPONSE_CHARS, InstructionPair

TASKS = ("continuation", "section")
# An 8,000-character piece (raw_corpus's split_target_chars) gets a cut every ~1,000 characters:
# passages rarely overlap, and a long document does not outweigh many short ones.
MAX_PAIRS_PER_TASK = 8
# Passage plus reply ~600 characters: ~200 tokens at ~3 characters a token, inside lora_checkpoint's
# default max_len of 256 with the chat frame (longer ones are truncated, not dropped).
PASSAGE_CHARS = 360
MAX_REPLY_CHARS = 240  # one or two sentences, about what the demo generates in 48 tokens
MIN_PASSAGE_CHARS = 80  # less context than a sentence or two leaves the continuation a guess
# Before whitespace and no lowercase letter: "e.g. the" and "etc. and" go on, "end. The" ends.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]»]*(?=\s+[^a-z\s])|[。！？][”’」』）]*")
_HEADING = re.compile(r"(#{1,6})[ \t]+(.*?)[ \t#]*")  # an ATX heading line, stripped
_UNDERLINE = re.compile(r"([=*~^+#-])\1{2,}")  # under a Markdown setext or reStructuredText heading
_WORD_GAP = re.compile(r"\s+")
_SPACE = re.compile(r"\s*")  # between a sentence's end and the next one's start


def _blocks(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each block in order: 'heading' (`_heading`), 'text' (a prose paragraph)
    or 'other' (a line of fenced code, indented code, a table). Blank lines end a paragraph."""
    blocks: list[tuple[str, int, int]] = []
    para: list | None = None  # [start, end, every line indented, starts with '|'] of the open paragraph
    pos, fenced = 0, False
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        body = line.strip()
        span = (start + len(line) - len(line.lstrip()), start + len(line.rstrip()))
        fence, heading = body.startswith("```"), not fenced and _HEADING.fullmatch(body)
        if para and (not body or fence or fenced or heading):
            blocks.append(_paragraph(text, para))
            para = None
        if fence or fenced:
            fenced ^= fence
            if body:
                blocks.append(("other", *span))
        elif heading:
            blocks.append(("heading", *span))
        elif body:
            indented = line.startswith(("    ", "\t"))  # code when every line is; a first-line indent is prose
            para = [para[0], span[1], para[2] and indented, para[3]] if para else [*span, indented, body[0] == "|"]
    if para:
        blocks.append(_paragraph(text, para))
    return blocks


def _paragraph(text: str, para: list) -> tuple[str, int, int]:
    start, end, indented, table = para
    if _heading(text[start:end]):
        return ("heading", start, end)
    return ("other" if indented or table else "text", start, end)


def _heading(block: str) -> tuple[int, str] | None:
    """(level, title) of a heading: `## Title` (level 2), or a title over a line of marks: `=` and
    `*` (as in Python's docs) level 1, others 2; None for other text."""
    atx = _HEADING.fullmatch(block)
    if atx:
        return len(atx.group(1)), atx.group(2)
    lines = block.split("\n")
    if len(lines) == 2 and _UNDERLINE.fullmatch(lines[1].strip()):
        return (1 if lines[1].strip()[0] in "=*" else 2), lines[0].strip()
    return None


def _sentence_ends(text: str, start: int, end: int) -> list[int]:
    """Offsets just past each sentence of the paragraph text[start:end]; its end ends the last one."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, start, end)]
    return ends if ends and ends[-1] == end else [*ends, end]


def _reply(text: str, cut: int, ends: list[int]) -> str:
    """The whole sentences from `cut` within MAX_REPLY_CHARS; "" when the first one is longer."""
    # a reply ending in ':' introduces what is not there: it would teach stopping mid-thought
    fit = [e for e in ends if cut < e <= cut + MAX_REPLY_CHARS and not text[cut:e].rstrip().endswith(":")]
    return text[cut : fit[-1]].strip() if fit else ""


def _passage(text: str, cut: int, starts: list[int]) -> str:
    """The whole sentences before `cut` within PASSAGE_CHARS (`starts`: sorted sentence and block
    starts); from a word boundary when a single sentence fills the window."""
    lo = max(0, cut - PASSAGE_CHARS)
    i = bisect.bisect_left(starts, lo)
    begin = starts[i] if i < len(starts) and starts[i] < cut else cut
    if cut - begin < MIN_PASSAGE_CHARS and lo > 0:
        gap = _WORD_GAP.search(text, lo, cut)
        begin = gap.end() if gap else lo  # text without spaces (Chinese) starts anywhere
    return text[begin:cut].strip()


def _spread(items: list, k: int) -> list:
    """At most `k` of `items`, evenly spaced over the list (a document's whole length)."""
    return items if len(items) <= k else [items[i * len(items) // k] for i in range(k)]


def _continuations(text: str, blocks: list, sentences: dict[int, list[int]]) -> list[tuple[int, str, str]]:
    """(cut, instruction, reply) for each sentence start with enough passage before and a reply after."""
    cuts = {i: [blocks[i][1], *(_SPACE.match(text, e).end() for e in ends[:-1])] for i, ends in sentences.items()}
    starts = sorted({start for _, start, _ in blocks} | {c for cs in cuts.values() for c in cs})
    found = []
    for i, block_cuts in cuts.items():
        for cut in block_cuts:
            passage, reply = _passage(text, cut, starts), _reply(text, cut, sentences[i])
            if len(passage) >= MIN_PASSAGE_CHARS and len(reply) >= MIN_RESPONSE_CHARS:
                found.append((cut, f"Continue this text:\n\n{passage}", reply))
    return found


def _sections(text: str, blocks: list, sentences: dict[int, list[int]]) -> list[tuple[int, str, str]]:
    """(cut, instruction, reply) for each heading followed by a paragraph."""
    headings = {i: _heading(text[s:e]) for i, (kind, s, e) in enumerate(blocks) if kind == "heading"}
    title = next((name for level, name in headings.values() if level == 1), "")
    found = []
    for i, (_, heading) in headings.items():
        if i + 1 not in sentences or not any(c.isalpha() for c in heading):  # "## 3" says nothing
            continue
        cut = blocks[i + 1][1]
        reply = _reply(text, cut, sentences[i + 1])
        of = f' of "{title}"' if title and title != heading else ""
        ask = f'Write the opening of the section "{heading}"{of}.' if of else f'Write the opening of "{heading}".'
        if len(reply) >= MIN_RESPONSE_CHARS:
            found.append((cut, ask, reply))
    return found


def pairs_from_text(doc_id: str, text: str) -> list[InstructionPair]:
    """Continuation and section pairs of one document, by the offset of their reply in it."""
    blocks = _blocks(text)
    sentences = {i: _sentence_ends(text, s, e) for i, (kind, s, e) in enumerate(blocks) if kind == "text"}
    tasks = [("continuation", t) for t in _spread(_continuations(text, blocks, sentences), MAX_PAIRS_PER_TASK)]
    tasks += [("section", t) for t in _spread(_sections(text, blocks, sentences), MAX_PAIRS_PER_TASK)]
    tasks.sort(key=lambda t: (t[1][0], t[0]))
    return [InstructionPair(ask, "", reply, doc_id, f"{task}@{cut}", doc_id, task) for task, (cut, ask, reply) in tasks]
