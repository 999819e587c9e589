"""The llama.cpp engine over the tiny model's GGUF export: the GGUF file of the served model is found
(and one of another model refused), replies stream in whole characters and equal the unstreamed
reply, a full queue raises QueueFull, and a cancelled request ends. Through the server:
tests/test_serving_llama_cpp.py."""

import threading

import pytest
from transformers import AutoTokenizer

from llm_assets.lib.posttrain.chat_data import prompt_ids
from llm_assets.lib.release import gguf_export
from llm_assets.lib.release.batching import GenerationRequest, QueueFull
from llm_assets.lib.release.llama_engine import LlamaCppEngine, load_gguf, made_from, served_gguf

PROMPT = "Dedent this: éà 中文"


def test_the_export_of_the_served_model_is_found_and_one_of_another_model_refused(tiny_gguf, tiny_base_dir, tmp_path):
    model_dir, gguf_dir = tiny_gguf
    assert served_gguf(model_dir, gguf_dir, "f16") == gguf_export.gguf_path(gguf_dir, "f16")
    quantized = tmp_path / "quantized"  # a quantized release names the model it quantized
    quantized.mkdir()
    (quantized / "quantization.json").write_text(f'{{"method": "nf4", "source": "{model_dir}"}}')
    assert made_from(quantized) == {quantized.resolve(), model_dir.resolve()}
    assert served_gguf(quantized, gguf_dir, "f16") == gguf_export.gguf_path(gguf_dir, "f16")
    with pytest.raises(ValueError, match="was exported from .* not from the served model"):
        served_gguf(tiny_base_dir, gguf_dir, "f16")
    with pytest.raises(FileNotFoundError, match="no GGUF export at .*model-q4_0.gguf.*llm-assets materialize --select gguf_model"):
        served_gguf(model_dir, gguf_dir, "q4_0")


def run(engine, request: GenerationRequest) -> tuple[list[str], object]:
    """The "text" pieces of one request and its finished sequence."""
    pieces, done = [], threading.Event()

    def on_event(kind, value):
        if kind == "text":
            pieces.append(value)
        else:
            done.set()

    seq = engine.submit(request, on_event)
    assert done.wait(60)
    return pieces, seq


def test_the_engine_streams_whole_characters_refuses_past_its_queue_and_cancels(tiny_gguf):
    model_dir, gguf_dir = tiny_gguf
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = LlamaCppEngine(load_gguf(gguf_export.gguf_path(gguf_dir, "f16"), model_dir, n_ctx=128), tok, max_queue=1)
    try:
        ids = prompt_ids(tok, [{"role": "user", "content": PROMPT}])
        # sampled hot, after a prompt with accents and CJK: replies with multi-byte characters split over tokens
        pieces, streamed = run(engine, GenerationRequest(ids, 32, temperature=1.5, seed=1))
        _, whole = run(engine, GenerationRequest(ids, 32, temperature=1.5, seed=1, stream=False))
        assert "".join(pieces) == streamed.text == whole.text and len(pieces) > 1
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # no half character sent mid-stream

        busy = threading.Event()  # the first request's first event holds the engine thread until released
        first = engine.submit(GenerationRequest(ids, 8), lambda *_: busy.wait(30))
        engine.submit(GenerationRequest(ids, 2), lambda *_: None)
        with pytest.raises(QueueFull):  # one running (or about to), one waiting: max_queue is 1
            engine.submit(GenerationRequest(ids, 2), lambda *_: None)
        first.cancel()
        busy.set()
    finally:
        engine.close(timeout=60)
    assert first.finish_reason in ("cancelled", "stop", "length") and not engine.thread.is_alive()
