import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llm_assets.lib.tokenizer.tokenizer import (
    CHAT_MARKERS, ROUNDTRIP_SAMPLES, SPECIAL_TOKENS, bytes_per_token, load_tokenizer, roundtrip_failures,
    sample_texts, token_pieces, train_tokenizer)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "textwrap.py", "csv.py", "shlex.py", "fnmatch.py", "heapq.py", "string.py",
           "bisect.py", "colorsys.py", "json/decoder.py", "json/encoder.py"]  # ~225 KB of code and prose
HELD_OUT = ["glob.py", "keyword.py", "queue.py"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([(STDLIB / m).read_text() for m in MODULES], vocab_size=512)


@pytest.mark.parametrize("text", [
    "", "hello world", "  leading and trailing  ", "café naïve Ångström", "東京 中文 한국어", "😀 👍🏽 👨‍👩‍👧 🇫🇷",
    "\n\n\t\t  \r\n \r  \t\n", "def f(x):\n    return {'a': [1, 2]}  # ok\n", "<|eos|> inside <|user|> text",
    "\x00\x01 control \x7f and \ufffd", *ROUNDTRIP_SAMPLES])
def test_roundtrip_is_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert roundtrip_failures(tok, [text]) == []


def test_roundtrip_on_held_out_modules_and_compression(tok):
    held_out = [(STDLIB / m).read_text() for m in HELD_OUT]
    assert roundtrip_failures(tok, held_out) == []
    # bytes alone give 1.0 byte per token; 249 merges of common Python and English reach ~2.0
    ours = bytes_per_token(tok, held_out)
    assert 1.8 < ours < 3.0
    # Baseline measured here: the same training text with 37 merges. More merges must compress more.
    fewer = train_tokenizer([(STDLIB / m).read_text() for m in MODULES], vocab_size=300)
    assert 1.0 < bytes_per_token(fewer, held_out) < ours


def test_special_tokens_have_fixed_ids_and_no_specials_are_added(tok):
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(7))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert tok.encode("abc") == tok.encode("abc", add_special_tokens=False)  # no bos/eos wrapping
    ids = tok.encode("<|user|>hi<|end|>", add_special_tokens=False)
    assert ids[0] == 4 and ids[-1] == 6


def test_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in tmp_path.iterdir()}
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    texts = [(STDLIB / m).read_text() for m in HELD_OUT] + list(ROUNDTRIP_SAMPLES)
    assert [again.encode(t, add_special_tokens=False) for t in texts] == \
           [tok.encode(t, add_special_tokens=False) for t in texts]
    assert again.all_special_ids == tok.all_special_ids
    assert again.chat_template == tok.chat_template
    assert roundtrip_failures(again, texts) == []
    assert load_tokenizer(tmp_path).encode("x = 1") == tok.encode("x = 1")


def test_training_is_deterministic(tok, tmp_path):
    # the DVC hash of the artifact is its data version: same text, same bytes, nothing downstream reruns
    again = train_tokenizer([(STDLIB / m).read_text() for m in MODULES], vocab_size=512)
    tok.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_load_tokenizer_names_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]


def test_chat_template_renders_roles_and_generation_prompt(tok):
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|system|>Answer briefly.<|end|>\n<|user|>What is 2+2?<|end|>\n<|assistant|>"
    assert tok.apply_chat_template(CHAT, tokenize=False) == prompt.removesuffix("<|assistant|>")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert [i for i in ids if i < len(SPECIAL_TOKENS)] == [3, 6, 4, 6, 5]
    assert set(CHAT_MARKERS) <= set(tok.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("response", ["4", "Four.", " four", "\nfour", "\tfour", "x\n", "", "😀 yes",
                                      "```python\nprint(4)\n```", "def f():\n    return 4\n",
                                      "  x", "    def f():", "\n\nx", "\n x", " \nx"])
def test_prompt_ids_are_a_prefix_of_prompt_plus_response_ids(tok, response):
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*CHAT, {"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(prompt)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    assert tok.encode(full, add_special_tokens=False)[:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("vocab_size", [0, 100, 263])
def test_vocab_size_must_leave_room_for_merges(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must exceed 263"):
        train_tokenizer(["some text"], vocab_size=vocab_size)


def test_smallest_vocabulary_is_bytes_only_and_still_exact():
    tok = train_tokenizer(["aaaa bbbb"], vocab_size=264, min_frequency=1)
    assert len(tok) == 264
    assert tok.decode(tok.encode("ünïcode 😀", add_special_tokens=False)) == "ünïcode 😀"


def test_sample_texts_caps_bytes_and_spreads_over_the_corpus():
    texts = [f"{i:03d}" + "x" * 96 for i in range(100)]  # 100 documents of 100 bytes
    assert sample_texts(texts, 0) == texts
    picked = sample_texts(texts, 2_000)
    assert sum(len(t) for t in picked) <= 2_000
    assert picked[0].startswith("000") and int(picked[-1][:3]) >= 90  # from start to end, not a prefix


def test_token_pieces_join_back_to_the_text(tok):
    assert "".join(token_pieces(tok, "    return self")) == "    return self"
