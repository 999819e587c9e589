"""The batching engine: replies batched equal replies alone and transformers' own generate."""

import threading

import pytest
import torch
from transformers import AutoTokenizer

from llm_assets.lib.posttrain.chat_data import prompt_ids
from llm_assets.lib.posttrain.generation import greedy_config
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.batching import MIN_TEMPERATURE, BatchEngine, GenerationRequest, QueueFull, collect

PROMPTS = ["Explain f().", "What does `csv.reader(lines, dialect)` return when lines is empty?", "Hi",
           "Write a function that splits text into words and counts them.", "heapq?", "Describe bisect.insort."]


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    """The tiny model with a generation_config that penalizes repeats (what tuned model dirs ship)."""
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = load_model(tiny_base_dir)
    model.generation_config = greedy_config(tok, 12, repetition_penalty=1.3, no_repeat_ngram_size=3)
    return model, tok


def asks(tok, max_new_tokens=(12, 5, 9, 12, 3, 7), **kw):
    return [GenerationRequest(prompt_ids(tok, [{"role": "user", "content": p}]), n, **kw)
            for p, n in zip(PROMPTS, max_new_tokens)]


def test_greedy_replies_batched_equal_replies_alone_and_transformers_generate(tiny):
    model, tok = tiny
    requests = asks(tok)
    batched = BatchEngine(model, tok, max_batch_size=4)  # 6 requests, 4 places: two join mid-flight
    alone = BatchEngine(model, tok, max_batch_size=1)
    try:
        together = [s.generated for s in collect(batched, requests)]
        one_by_one = [collect(alone, [r])[0].generated for r in requests]
    finally:
        batched.close(), alone.close()
    assert together == one_by_one
    assert max(batched.batch_sizes) == 4 and set(alone.batch_sizes) == {1}
    stop = {tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id, tok.pad_token_id}
    for request, ids in zip(requests, together):  # what transformers' generate picks, with the same config
        x = torch.tensor([request.prompt_ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=model.generation_config,
                             max_new_tokens=request.max_new_tokens)
        hf = out[0, x.shape[1]:].tolist()
        assert [t for t in ids if t not in stop] == [t for t in hf if t not in stop][:len(ids)], request


def test_no_stop_token_before_min_new_tokens_as_transformers_generate(tiny):
    """A model pushed to end every reply at once: with min_new_tokens 0 the reply is empty, with
    the shipped configs' 1 it has a token, both as transformers' generate decodes them."""
    model, tok = tiny
    end = tok.convert_tokens_to_ids("<|end|>")

    def ends_at_once(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([end]), torch.full((*logits.shape[:-1], 1), 1e4))

    hook = model.lm_head.register_forward_hook(ends_at_once)
    shipped = model.generation_config
    try:
        for min_new in (0, 1):
            model.generation_config = greedy_config(tok, 12, repetition_penalty=1.3, no_repeat_ngram_size=3,
                                                    min_new_tokens=min_new)
            engine = BatchEngine(model, tok, max_batch_size=4)
            try:
                replies = [s.generated for s in collect(engine, asks(tok))]
            finally:
                engine.close()
            for request, ids in zip(asks(tok), replies):
                x = torch.tensor([request.prompt_ids])
                out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=model.generation_config,
                                     max_new_tokens=request.max_new_tokens)
                reply = [t for t in ids if t != end]  # the engine keeps the stop token it picked
                assert reply == [t for t in out[0, x.shape[1]:].tolist() if t != end]
                assert len(reply) == min_new and ids[-1] == end  # the forced token, then the stop
    finally:
        hook.remove()
        model.generation_config = shipped


def test_seeded_sampling_is_the_same_batched_and_alone_and_tiny_temperatures_are_greedy(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch_size=6)
    try:
        sampled = [s.generated for s in collect(engine, asks(tok, temperature=0.9, top_p=0.9, seed=7))]
        again = [collect(engine, [r])[0].generated for r in asks(tok, temperature=0.9, top_p=0.9, seed=7)]
        greedy = [s.generated for s in collect(engine, asks(tok))]
        tiny_t = [s.generated for s in collect(engine, asks(tok, temperature=MIN_TEMPERATURE / 1e298))]
    finally:
        engine.close()
    assert sampled == again and sampled != greedy
    assert tiny_t == greedy


def test_stop_strings_cut_the_reply_and_text_arrives_in_pieces(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok)
    pieces = []
    try:
        full = collect(engine, asks(tok)[:1])[0]
        stop = full.text[3:5]
        done = threading.Event()
        seq = engine.submit(GenerationRequest(asks(tok)[0].prompt_ids, 12, stop=(stop,)),
                            lambda kind, v: pieces.append((kind, v)) or (kind == "done" and done.set()))
        assert done.wait(60)
    finally:
        engine.close()
    assert seq.finish_reason == "stop" and seq.text == full.text[:full.text.index(stop)]
    assert "".join(v for k, v in pieces if k == "text") == seq.text and pieces[-1] == ("done", "stop")


def test_a_request_that_does_not_stream_gets_its_text_once_at_the_end(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok)
    events = []
    try:
        streamed = collect(engine, asks(tok))
        quiet = [GenerationRequest(r.prompt_ids, r.max_new_tokens, stream=False) for r in asks(tok)]
        done = threading.Semaphore(0)
        seqs = [engine.submit(r, lambda kind, v, i=i: events.append((i, kind, v)) or (kind == "done" and done.release()))
                for i, r in enumerate(quiet)]
        assert all(done.acquire(timeout=60) for _ in seqs)
    finally:
        engine.close()
    assert [s.text for s in seqs] == [s.text for s in streamed] and [s.generated for s in seqs] == [
        s.generated for s in streamed]
    for i, s in enumerate(seqs):
        mine = [(kind, v) for j, kind, v in events if j == i]
        assert mine == ([("text", s.text)] if s.text else []) + [("done", s.finish_reason)]


def test_a_full_queue_raises_and_a_cancelled_request_leaves_the_batch(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch_size=1, max_queue=1)
    started, events = threading.Event(), []
    try:
        first = engine.submit(GenerationRequest(asks(tok)[0].prompt_ids, 10_000),
                              lambda kind, v: started.set() or events.append(kind))
        assert started.wait(60)  # first is running: the one place is taken
        second = engine.submit(GenerationRequest(asks(tok)[1].prompt_ids, 3), lambda *a: None)
        with pytest.raises(QueueFull, match="queue limit"):
            engine.submit(GenerationRequest(asks(tok)[2].prompt_ids, 3), lambda *a: None)
        first.cancel()
        engine.close(timeout=60)
    finally:
        first.cancel()
        engine.close()
    assert first.finish_reason == "cancelled" and len(first.generated) < 10_000 and "done" not in events
    assert second.finish_reason == "length" and len(second.generated) == 3


def test_a_failing_forward_pass_is_an_error_event_and_the_engine_goes_on(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok)
    try:
        bad, good = collect(engine, [GenerationRequest([10**6], 3), asks(tok)[0]])
    finally:
        engine.close()
    assert bad.finish_reason == "error" and good.finish_reason in ("length", "stop")
