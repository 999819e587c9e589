"""Hostile and careless clients against a real uvicorn on loopback (the probes of issue 16): huge
bodies, non-finite numbers, clients that leave or stall, unknown paths, missing API keys."""

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from helpers import uvicorn_thread
from llm_assets.lib.monitor.serving_log import read_log
from llm_assets.serving.app import ServeSettings, create_app, exposure_warning
from llm_assets.serving.guards import header_timeout_protocol
from llm_assets.serving.load import ServerProcess

TEN_MB = 10 * 1024 * 1024


def start(tmp_path, model_dir, **kw):
    settings = ServeSettings(model_dir=model_dir, releases_dir=tmp_path / "none", log_dir=tmp_path / "serving",
                             drift_dir=tmp_path / "drift", log_flush_seconds=60, **kw)
    return uvicorn_thread(create_app(settings), http=header_timeout_protocol(settings.header_timeout_s))


def metric(url: str, line: str) -> float:
    """The value of one sample of /metrics, 0 when absent."""
    for row in httpx.get(f"{url}/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def post_huge(url: str, body: bytes, results: list) -> None:
    """POST `body` to /generate on a raw socket (sendall runs without the GIL: the clients should not
    slow this process's /health probe): the headers, the answer if one comes before the body (a body
    over the limit is refused from its Content-Length), then the body, which a server that refused
    it and closed may reset."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall((f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode())
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            results.append(int(sock.recv(4096).split(b" ")[1]))  # refused before the body
            return
        sock.settimeout(60)
        sock.sendall(body)
        results.append(int(sock.recv(4096).split(b" ")[1]))


def health_under_six_huge_posts(url: str, body: bytes) -> tuple[float, list]:
    """The slowest /health answer while six `body`s are posted at once, and what the posts got."""
    results: list = []
    posts = [threading.Thread(target=post_huge, args=(url, body, results)) for _ in range(6)]
    for p in posts:
        p.start()
    slowest, probes = 0.0, 0
    while any(p.is_alive() for p in posts) or probes < 3:
        t = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        slowest, probes = max(slowest, time.perf_counter() - t), probes + 1
        time.sleep(0.05)
    for p in posts:
        p.join()
    return slowest, results


def test_health_answers_within_a_second_under_six_10_mb_prompts(tmp_path, tiny_base_dir):
    prompt = json.dumps({"prompt": "word " * (TEN_MB // 5), "max_new_tokens": 4}).encode()
    # `llm-assets serve` in a process of its own (clients in this one would hold its GIL), defaults:
    # a 1 MiB body limit, so a 10 MB body is refused from its Content-Length, unread
    with ServerProcess(tmp_path, tiny_base_dir) as url:
        slowest, results = health_under_six_huge_posts(url, prompt)
        assert slowest < 1.0, slowest
        assert metric(url, 'llm_requests_total{endpoint="generate",model_version="none",status="413"}') == 6
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="body_too_large"}') == 6
        assert results == [413] * 6
        print(f"/health slowest answer under six 10 MB prompts: {slowest:.3f} s ({results})")
        # just under the body limit: read and parsed, then refused by the character cap, untokenized
        slowest, results = health_under_six_huge_posts(url, json.dumps({"prompt": "word " * 200_000}).encode())
        assert slowest < 1.0 and results == [422] * 6, (slowest, results)
        r = httpx.post(f"{url}/generate", json={"prompt": "word " * 200_000})
        assert r.status_code == 422 and r.json()["detail"] == "prompt is 1000000 characters, over the cap of 16384"
        print(f"/health slowest answer under six 1 MB prompts: {slowest:.3f} s")


def test_non_finite_numbers_are_a_clean_4xx_and_a_tiny_temperature_is_greedy(tmp_path, tiny_base_dir):
    with start(tmp_path, tiny_base_dir) as url, httpx.Client(base_url=url, timeout=60) as client:
        for value in ("NaN", "Infinity", "-Infinity", "1e999"):
            r = client.post("/generate", content=f'{{"prompt": "x", "temperature": {value}}}'.encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "temperature"], value
            r = client.post("/v1/completions", content=f'{{"model": "m", "prompt": "x", "top_p": {value}}}'.encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_p", value
            assert client.get("/health").json()["status"] == "ok"  # the connection and the server are fine
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="invalid_request"}') == 4
        greedy = client.post("/generate", json={"prompt": "Explain f().", "max_new_tokens": 6}).json()
        tiny = client.post("/generate", json={"prompt": "Explain f().", "max_new_tokens": 6, "temperature": 1e-300})
        assert tiny.status_code == 200 and tiny.json()["text"] == greedy["text"]
        with client.stream("POST", "/generate/stream", json={"prompt": "Explain f().", "max_new_tokens": 6,
                                                             "temperature": 1e-300}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and events[-1]["completion_tokens"] == greedy["completion_tokens"]


def test_a_client_that_leaves_stops_its_generation_frees_its_place_and_is_logged_and_counted(tmp_path, tiny_base_dir):
    # one place, no queue: while a generation runs, the next request gets 429 (the tiny untrained
    # model never picks a stop token, so 10,000 tokens run for minutes unless stopped)
    with start(tmp_path, tiny_base_dir, max_batch_size=1, max_queue=0, max_new_tokens_cap=10_000) as url:
        with httpx.stream("POST", f"{url}/generate/stream", json={"prompt": "stream", "max_new_tokens": 10_000},
                          timeout=60):  # the 200 is in: it was admitted and runs
            busy = httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": 2})
            assert busy.status_code == 429 and "queue limit is 0" in busy.json()["detail"]
        assert eventually_answered(url)
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            httpx.post(f"{url}/generate", json={"prompt": "plain", "max_new_tokens": 10_000}, timeout=1.5)
        assert eventually_answered(url)
        assert metric(url, 'llm_requests_total{endpoint="stream",model_version="dir:' + tiny_base_dir.name +
                      '",status="499"}') == 1
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="client_disconnected"}') == 1
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="busy"}') >= 1
    log = {r["prompt"]: r for r in read_log(tmp_path / "serving").to_pylist()}
    for prompt in ("stream", "plain"):
        assert log[prompt]["status"] == "client_disconnected" and 0 < log[prompt]["response_tokens"] < 10_000


def eventually_answered(url: str, within_s: float = 20.0) -> bool:
    """A short request gets a 200 before `within_s` (it gets 429 while the one place is taken)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/generate", json={"prompt": "next", "max_new_tokens": 2}, timeout=60).status_code == 200:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def broken_model_dir(tiny_base_dir, tmp_path):
    """Its embedding has 16 rows for a 512-token tokenizer: every real prompt fails in the forward pass."""
    from transformers import AutoTokenizer

    from llm_assets.lib.pretrain.model import build_model
    from llm_assets.lib.pretrain.model_dir import save_model

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    save_model(build_model("tiny", 16, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, tmp_path / "broken")
    return tmp_path / "broken"


def test_a_worker_error_reaches_an_openai_stream_as_an_error_event(tmp_path, broken_model_dir):
    with start(tmp_path, broken_model_dir) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError, match="generation failed: IndexError"):
            list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
        with pytest.raises(openai.InternalServerError, match="generation failed: IndexError"):
            client.completions.create(model="m", prompt="hi")
        assert metric(url, 'llm_errors_total{endpoint="chat_completions",reason="generation_error"}') == 1
        assert metric(url, 'llm_requests_total{endpoint="completions",model_version="dir:broken",status="500"}') == 1
    assert [r["status"] for r in read_log(tmp_path / "serving").to_pylist()] == ["IndexError", "IndexError"]


def raw_exchange(url: str, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` on a raw connection, then read until the server closes it: (what came, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        start = time.perf_counter()
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        return got, time.perf_counter() - start


def test_slow_headers_and_a_body_shorter_than_announced_are_cut_off(tmp_path, tiny_base_dir):
    with start(tmp_path, tiny_base_dir, header_timeout_s=0.5, body_timeout_s=0.5) as url:
        got, seconds = raw_exchange(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: appl", wait_s=10)
        assert got.startswith(b"HTTP/1.1 408") and seconds < 5
        got, seconds = raw_exchange(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 999999\r\n\r\n{\"prompt\":", wait_s=10)
        assert got.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in got and seconds < 5
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="body_timeout"}') == 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_4xx_of_every_kind_are_counted_and_the_api_key_guards_all_but_health_and_metrics(tmp_path, tiny_base_dir):
    with start(tmp_path, tiny_base_dir, api_key="s3cret") as url, httpx.Client(base_url=url, timeout=60) as client:
        key = {"authorization": "Bearer s3cret"}
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 2})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.post("/generate", json={"prompt": "x"}, headers={"authorization": "Bearer nope"}).status_code == 401
        assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}, headers=key).status_code == 200
        assert client.get("/nowhere", headers=key).status_code == 404
        assert client.get("/generate", headers=key).status_code == 405
        assert client.post("/generate", content=b"{", headers={**key, "content-type": "application/json"}).status_code == 422
        assert client.post("/v1/completions", json={"model": "m"}, headers=key).status_code == 400
        models = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in models.data] == [f"dir:{tiny_base_dir.name}"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        counted = {(e, s): metric(url, f'llm_requests_total{{endpoint="{e}",model_version="none",status="{s}"}}')
                   for e, s in [("generate", 401), ("other", 404), ("generate", 405), ("generate", 422),
                                ("completions", 400), ("models", 401)]}
        assert counted == {("generate", 401): 2, ("other", 404): 1, ("generate", 405): 1, ("generate", 422): 1,
                           ("completions", 400): 1, ("models", 401): 1}
        assert metric(url, 'llm_errors_total{endpoint="generate",reason="unauthorized"}') == 2


def test_binding_beyond_loopback_without_a_key_is_warned_about():
    assert "no API key" in exposure_warning("0.0.0.0", None) and "LLM_ASSETS_API_KEY" in exposure_warning("::", None)
    assert exposure_warning("10.1.2.3", None) is not None and exposure_warning("example.org", None) is not None
    assert [exposure_warning(h, None) for h in ("127.0.0.1", "::1", "localhost")] == [None] * 3
    assert exposure_warning("0.0.0.0", "s3cret") is None
