"""The model server on a real uvicorn on loopback, serving a tiny model through the release pointer."""

import json
import time
from contextlib import contextmanager

import httpx
import pytest

from helpers import uvicorn_thread
from llm_assets.lib.release.release import Gate, publish
from llm_assets.lib.monitor.serving_log import read_log
from llm_assets.serving.app import ServeSettings, create_app
from llm_assets.serving.guards import header_timeout_protocol


@contextmanager
def served(app):
    """An httpx client of `app` on a real uvicorn (helpers.uvicorn_thread) with the header read
    timeout `llm-assets serve` runs it with; leaving stops the server as SIGTERM does."""
    http = header_timeout_protocol(app.state.server.settings.header_timeout_s)
    with uvicorn_thread(app, http=http) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture
def releases(tiny_base_dir, tmp_path):
    d = tmp_path / "releases"
    publish(tiny_base_dir, d, "v1", [Gate("g", True, 0, 0)], {"model": "test"})
    return d


def settings(tmp_path, releases, **kw):
    return ServeSettings(releases_dir=releases, log_dir=tmp_path / "serving", log_flush_seconds=60, **kw)


def test_generate_stream_health_metrics_and_every_request_logged(tmp_path, releases):
    app = create_app(settings(tmp_path, releases))
    with served(app) as client:
        assert client.get("/health").json() == {"status": "ok", "model_version": "v1", "engine": "torch"}
        r = client.post("/generate", json={"prompt": "Explain what `f(x)` does.", "max_new_tokens": 5})
        assert r.status_code == 200
        body = r.json()
        assert body["model_version"] == "v1" and 0 <= body["completion_tokens"] <= 5 and body["prompt_tokens"] > 5
        sampled = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 4, "temperature": 0.8})
        assert sampled.status_code == 200
        with client.stream("POST", "/generate/stream", json={"prompt": "Hello", "max_new_tokens": 6}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and events[-1]["model_version"] == "v1"
        metrics = client.get("/metrics").text
        assert 'llm_requests_total{endpoint="generate",model_version="v1",status="200"} 2.0' in metrics
        assert 'llm_requests_total{endpoint="stream",model_version="v1",status="200"} 1.0' in metrics
        assert "llm_request_latency_seconds_bucket" in metrics and "llm_generated_tokens_total" in metrics
        assert read_log(tmp_path / "serving").num_rows == 0  # still buffered (flush after 60 s or 64 rows)
    log = read_log(tmp_path / "serving").to_pylist()  # the shutdown flushed it
    assert len(log) == 3 and {r["prompt"] for r in log} == {"Explain what `f(x)` does.", "Hi", "Hello"}
    assert all(r["model_version"] == "v1" and r["status"] == "ok" and r["latency_seconds"] > 0 for r in log)


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(tmp_path, releases):
    app = create_app(settings(tmp_path, releases, max_prompt_tokens=40, max_new_tokens_cap=8))
    with served(app) as client:
        r = client.post("/generate", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "json" in r.text.lower()
        r = client.post("/generate", json={"prompt": 42})
        assert r.status_code == 422 and "prompt" in r.text
        r = client.post("/generate", json={"prompt": "x", "max_new_tokens": "many"})
        assert r.status_code == 422 and "max_new_tokens" in r.text
        r = client.post("/generate", json={"prompt": "x", "bogus": 1})
        assert r.status_code == 422 and "bogus" in r.text
        r = client.post("/generate", json={"prompt": "word " * 200, "max_new_tokens": 3})
        assert r.status_code == 422 and "over the cap of 40" in r.json()["detail"]
        r = client.post("/generate", json={"prompt": "x", "max_new_tokens": 9})
        assert r.status_code == 422 and r.json()["detail"] == "max_new_tokens 9 is over the cap of 8"
        assert client.post("/generate", json={"prompt": "still there?", "max_new_tokens": 3}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'llm_errors_total{endpoint="generate",reason="invalid_request"} 4.0' in metrics
        assert 'llm_errors_total{endpoint="generate",reason="prompt_too_long"} 1.0' in metrics


def test_a_new_release_is_served_without_a_restart(tmp_path, releases, tiny_base_dir):
    app = create_app(settings(tmp_path, releases))
    with served(app) as client:
        assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 2}).json()["model_version"] == "v1"
        time.sleep(0.01)  # a distinct mtime for the pointer
        publish(tiny_base_dir, releases, "v2", [Gate("g", True, 0, 0)], {"model": "test"})
        assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 2}).json()["model_version"] == "v2"
        assert client.get("/health").json()["model_version"] == "v2"


@pytest.fixture
def broken_model_dir(tiny_base_dir, tmp_path):
    """Loads and warms up fine, but its embedding has 16 rows for a 512-token tokenizer: every real
    prompt fails inside model.generate (IndexError in the embedding lookup)."""
    from transformers import AutoTokenizer

    from llm_assets.lib.pretrain.model import build_model
    from llm_assets.lib.pretrain.model_dir import save_model

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    out = tmp_path / "broken"
    save_model(build_model("tiny", 16, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, out)
    return out


def test_a_failure_during_generation_is_logged_and_counted_the_same_on_both_endpoints(tmp_path, broken_model_dir):
    # One place in the batch and no queue: a place a failure did not give back turns the next request into a 429.
    app = create_app(settings(tmp_path, tmp_path / "no-releases", model_dir=broken_model_dir, max_batch_size=1,
                              max_queue=0))
    with served(app) as client:
        assert client.get("/health").json() == {"status": "ok", "model_version": "dir:broken", "engine": "torch"}
        r = client.post("/generate", json={"prompt": "plain", "max_new_tokens": 3})
        assert r.status_code == 500 and r.json()["detail"].startswith("generation failed: IndexError")
        with client.stream("POST", "/generate/stream", json={"prompt": "streamed", "max_new_tokens": 3}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events == [{"error": r.json()["detail"]}]
        assert client.post("/generate", json={"prompt": "again", "max_new_tokens": 3}).status_code == 500
        metrics = client.get("/metrics").text
        for endpoint, n in (("generate", 2), ("stream", 1)):
            assert f'llm_requests_total{{endpoint="{endpoint}",model_version="dir:broken",status="500"}} {n}.0' in metrics
            assert f'llm_errors_total{{endpoint="{endpoint}",reason="generation_error"}} {n}.0' in metrics
        assert 'endpoint="generate",status="200"' not in metrics and 'endpoint="stream",status="200"' not in metrics
    log = read_log(tmp_path / "serving").to_pylist()
    assert sorted((r["prompt"], r["status"], r["response"], r["response_tokens"], r["model_version"]) for r in log) == [
        (p, "IndexError", "", 0, "dir:broken") for p in ("again", "plain", "streamed")]


def test_no_release_answers_503(tmp_path):
    app = create_app(settings(tmp_path, tmp_path / "no-releases"))
    with served(app) as client:
        assert client.get("/health").json() == {"status": "no_model", "model_version": None, "engine": "torch"}
        r = client.post("/generate", json={"prompt": "a"})
        assert r.status_code == 503 and "no release to serve" in r.json()["detail"]


def test_llm_assets_serve_process_flushes_its_log_on_sigterm(tmp_path, tiny_base_dir):
    import signal

    from llm_assets.serving.load import ServerProcess

    server = ServerProcess(tmp_path, tiny_base_dir)  # waits for /health (up to 120 s on a busy machine)
    with server as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(5):
            assert client.post("/generate", json={"prompt": f"q{i}", "max_new_tokens": 2}).status_code == 200
    # leaving the block sent SIGTERM; uvicorn shuts down gracefully, then re-raises SIGTERM so the
    # exit status says what stopped it
    assert server.proc.returncode in (0, -signal.SIGTERM), server.output
    assert "Application shutdown complete" in server.output
    assert sorted(read_log(tmp_path / "data/serving")["prompt"].to_pylist()) == [f"q{i}" for i in range(5)]


@pytest.mark.parametrize("variant", ["fp32", "nf4"])
def test_concurrent_load_on_a_real_server_process_is_all_answered_and_logged(tmp_path, tiny_base_dir, variant):
    from llm_assets.lib.release.quantize import quantize
    from llm_assets.serving.load import ServerProcess, send, summarize

    model_dir = tiny_base_dir
    if variant == "nf4":  # concurrent first forwards once corrupted bitsandbytes' CPU weight repacking
        model_dir = tmp_path / "nf4"
        model_dir.mkdir()
        quantize(tiny_base_dir, model_dir, "nf4")
    prompts = [f"Explain what `mod.f{i}(x)` does." for i in range(40)]
    start = time.perf_counter()
    with ServerProcess(tmp_path, model_dir) as url:
        results = send(url, prompts, concurrency=8, max_new_tokens=4)
    stats = summarize(results, time.perf_counter() - start)
    assert stats["errors"] == 0 and stats["ok"] == 40, [r for r in results if r["status"] != 200][:3]
    assert stats["latency_p95_s"] >= stats["latency_p50_s"] > 0
    assert sorted(read_log(tmp_path / "data/serving")["prompt"].to_pylist()) == sorted(prompts)
