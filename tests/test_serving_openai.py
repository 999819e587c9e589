"""The OpenAI-compatible endpoints, driven by the official `openai` client against a real uvicorn on
loopback serving a tiny model through the release pointer."""

import httpx
import openai
import pytest

from helpers import uvicorn_thread
from llm_assets.lib.monitor.serving_log import read_log
from llm_assets.lib.release.release import Gate, publish
from llm_assets.serving.app import ServeSettings, create_app
from llm_assets.serving.guards import header_timeout_protocol

CHAT = [{"role": "system", "content": "You explain Python."}, {"role": "user", "content": "Explain what `f(x)` does."}]


def test_the_openai_client_chats_streams_completes_and_gets_bad_request_errors(tiny_base_dir, tmp_path):
    publish(tiny_base_dir, tmp_path / "releases", "v1", [Gate("g", True, 0, 0)], {"model": "test"})
    settings = ServeSettings(releases_dir=tmp_path / "releases", log_dir=tmp_path / "serving",
                             drift_dir=tmp_path / "drift", log_flush_seconds=60, max_new_tokens_cap=16)
    with uvicorn_thread(create_app(settings), http=header_timeout_protocol(settings.header_timeout_s)) as url:
        talk_to(url)
    log = read_log(tmp_path / "serving").to_pylist()  # the shutdown flushed it; refused requests never reached the model
    assert sorted((r["prompt"], r["model_version"], r["status"]) for r in log) == [
        ("Explain what `f(x)` does.", "v1", "ok"), ("Explain what `f(x)` does.", "v1", "ok"),
        ("def add(a, b):", "v1", "ok"), ("def add(a, b):", "v1", "ok")]
    assert all(0 < r["response_tokens"] <= 6 and r["prompt_tokens"] > 1 for r in log)


def talk_to(served: str) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="not-checked", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["v1"]

    chat = client.chat.completions.create(model="llm-assets", messages=CHAT, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "v1" and chat.id.startswith("chatcmpl-")
    reply = chat.choices[0]
    assert reply.message.role == "assistant" and reply.finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 8 and 1 <= chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="llm-assets", messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.message.content  # greedy: the same reply, in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and chunks[-1].model == "v1"

    text = client.completions.create(model="llm-assets", prompt="def add(a, b):", max_tokens=5, temperature=0.7,
                                     top_p=0.9, seed=3)
    again = client.completions.create(model="llm-assets", prompt="def add(a, b):", max_tokens=5, temperature=0.7,
                                      top_p=0.9, seed=3)
    assert text.object == "text_completion" and text.choices[0].text == again.choices[0].text
    assert text.usage.completion_tokens <= 5

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llm-assets", messages=CHAT, n=2)
    assert "only n=1 is supported" in e.value.message and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="over the cap of 16"):
        client.chat.completions.create(model="llm-assets", messages=CHAT, max_tokens=17)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="llm-assets", prompt="x", temperature=2.5)

    raw = httpx.post(f"{served}/v1/chat/completions", headers={"content-type": "application/json"},
                     content=b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "temperature"
    assert raw.json()["error"]["type"] == "invalid_request_error"
    metrics = httpx.get(f"{served}/metrics").text
    assert 'llm_requests_total{endpoint="chat_completions",model_version="v1",status="200"} 2.0' in metrics
    assert 'llm_requests_total{endpoint="completions",model_version="v1",status="200"} 2.0' in metrics
    assert 'llm_errors_total{endpoint="chat_completions",reason="invalid_request"} 2.0' in metrics
    assert 'llm_errors_total{endpoint="chat_completions",reason="max_new_tokens"} 1.0' in metrics
