r"""A byte-level BPE tokenizer trained on the corpus, saved in the `transformers` format.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.tokenizer.tokenizer import (bytes_per_token, load_tokenizer,
    ...                                                 roundtrip_failures, token_pieces, train_tokenizer)
    >>> texts = ["def add(a, b):\n    return a + b\n", "def wrap(text, width=70):\n    return text\n"] * 20
    >>> tok = train_tokenizer(texts, vocab_size=300)
    >>> out_dir = Path(tempfile.mkdtemp())
    >>> _ = tok.save_pretrained(out_dir)
    >>> sorted(p.name for p in out_dir.iterdir())
    ['chat_template.jinja', 'tokenizer.json', 'tokenizer_config.json']
    >>> tok = load_tokenizer(out_dir)           # transformers.AutoTokenizer, local files only
    >>> token_pieces(tok, "def wrap(text):"), bytes_per_token(tok, texts) > 2
    (['def', ' wrap', '(', 'text', '):'], True)
    >>> roundtrip_failures(tok, ["", "café 東京 😀", "<|eos|> is text here"])
    []
    >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    '<|user|>hi<|end|>\n<|assistant|>'

Hugging Face `tokenizers` BPE over GPT-2's byte-level pre-tokenizer, with no normalizer: text is
split by GPT-2's regex, mapped byte for byte to 256 printable symbols (the initial alphabet, so any
byte string is representable and nothing is ever unknown), and merges are learned on top.
`decode(encode(x)) == x` for every string; `roundtrip_failures` checks it.

Ids 0..6 are the special tokens below, 7..262 the byte alphabet, then the merges. The chat template
renders each message as `<|role|>{content}<|end|>\n` and the generation prompt ends in the special
token `<|assistant|>`. A special token is always a token boundary, so the prompt's ids are a prefix
of prompt + response ids for every response (a prompt ending in a newline would not guarantee
that: GPT-2's regex glues the newline to a response that starts with whitespace).

Run on its own (prints bytes per token on a few stdlib modules):
    python -m llm_assets.lib.tokenizer.tokenizer
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_MARKERS)  # ids 0..6, in this order
BYTE_ALPHABET = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Fixed strings the round-trip gate always checks, beside the validation documents.
ROUNDTRIP_SAMPLES = (
    "",
    "plain ASCII, with punctuation: (a, b) -> {c}; 42!",
    "accents: café, naïve, Ångström, Øresund, façade, jalapeño",
    "CJK: 東京都 中文分词 한국어 テスト",
    "emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "mixed newlines\r\nand\rtabs\t\tand  spaces   \n\n\n  trailing \t",
    "zero width\u200bjoiner\u200d, combining e\u0301 vs \u00e9, NBSP\u00a0here",
    "def f(x):\n\tif x:\n        return {'k': [1, 2.5e-3]}  # comment\n",
    "special-looking text: <|eos|> <|user|> <|end|>",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges on `texts`. `vocab_size` counts everything (specials, 256 bytes,
    merges); a small corpus can stop short of it when no pair reaches `min_frequency`."""
    if vocab_size <= len(SPECIAL_TOKENS) + BYTE_ALPHABET:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + BYTE_ALPHABET} "
                         f"({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET} bytes), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(CHAT_MARKERS),
        clean_up_tokenization_spaces=False)  # True would rewrite " ," to "," and break exact decode
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved with `save_pretrained`, from a local directory (never the Hub)."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (not a saved tokenizer)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def sample_texts(texts: Sequence[str], max_bytes: int) -> list[str]:
    """At most `max_bytes` of UTF-8 text, taking every k-th document so every part of the corpus
    (docs, modules, tests: the shards are sorted by doc_id) is represented. 0 = everything."""
    sizes = [len(t.encode()) for t in texts]
    total = sum(sizes)
    if max_bytes <= 0 or total <= max_bytes:
        return list(texts)
    stride = -(-total // max_bytes)  # ceil
    picked, used = [], 0
    for i in range(0, len(texts), stride):
        if used + sizes[i] > max_bytes and picked:
            break
        picked.append(texts[i])
        used += sizes[i]
    return picked


def bytes_per_token(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over `texts` (no special tokens added): higher is better compression."""
    encodings = tok.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    if tokens == 0:
        raise ValueError("bytes_per_token: the texts encode to no tokens (empty input)")
    return sum(len(t.encode()) for t in texts) / tokens


def roundtrip_failures(tok: PreTrainedTokenizerFast, texts: Sequence[str], batch: int = 64) -> list[int]:
    """Indices of the texts where `tok.decode(tok.encode(x))` is not exactly `x`, through the
    `transformers` wrapper (its decode settings are part of what is checked)."""
    failures = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        ids = tok(chunk, add_special_tokens=False)["input_ids"]
        decoded = tok.batch_decode(ids, skip_special_tokens=False)
        failures += [start + i for i, (x, y) in enumerate(zip(chunk, decoded)) if x != y]
    return failures


def token_pieces(tok: PreTrainedTokenizerFast, text: str) -> list[str]:
    """The text each token stands for (a piece splitting a multi-byte character shows as U+FFFD)."""
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]


if __name__ == "__main__":
    import sysconfig
    import time

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text() for p in sorted(stdlib.glob("*.py"))[:120]]
    start = time.perf_counter()
    tok = train_tokenizer(docs[:100], vocab_size=2048)
    print(f"trained on {sum(map(len, docs[:100])) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s; "
          f"{len(tok)} tokens; held-out bytes/token {bytes_per_token(tok, docs[100:]):.2f}; "
          f"round-trip failures {roundtrip_failures(tok, docs[100:] + list(ROUNDTRIP_SAMPLES))}")
