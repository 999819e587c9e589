"""`llm-assets serve --engine llama.cpp`: the GGUF export of the served model (the trained tiny model,
its generation_config asking for a repetition penalty) behind the same HTTP API, as a real server
process per test. Greedy replies equal the torch engine's on the same prompts (f16), the official
`openai` client streams, the serving log and /metrics say llama.cpp answered, and a server without
the export refuses to start, naming the file and the command that makes it."""

import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from llm_assets.lib.common.paths import ProjectPaths
from llm_assets.lib.monitor.serving_log import read_log
from llm_assets.lib.posttrain.chat_data import prompt_ids
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.batching import BatchEngine, GenerationRequest, collect
from llm_assets.serving.load import ServerProcess

PROMPTS = ["Explain what `textwrap.wrap(text)` does.", "What does `csv.reader(f)` return?",
           "Write a function that splits a line.", "def fill(text, width=70):", "Why use a heap?", "Dedent this: éà 中文"]


def project_with(tiny_gguf, tmp_path):
    """A project directory whose gguf_model artifact is the export (each test its own serving log)."""
    shutil.copytree(tiny_gguf[1], ProjectPaths(tmp_path).artifact("gguf_model"))
    return tmp_path


def llama_server(tiny_gguf, tmp_path, *args):
    return ServerProcess(project_with(tiny_gguf, tmp_path), tiny_gguf[0],
                         ["--engine", "llama.cpp", "--gguf-type", "f16", *args])


def torch_replies(model_dir, n: int) -> list[str]:
    """The torch engine's greedy replies to PROMPTS (what `--engine torch` answers), stripped as /generate does."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = BatchEngine(load_model(model_dir).eval(), tok, max_batch_size=1)
    try:
        asks = [GenerationRequest(prompt_ids(tok, [{"role": "user", "content": p}]), n) for p in PROMPTS]
        return [s.text.strip() for s in collect(engine, asks)]
    finally:
        engine.close()


def test_greedy_replies_equal_the_torch_engines_and_are_logged_and_counted_as_llama_cpp(tiny_gguf, tmp_path):
    with llama_server(tiny_gguf, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as client:
        replies = [client.post("/generate", json={"prompt": p, "max_new_tokens": 16}).json() for p in PROMPTS]
        health = client.get("/health").json()
        metrics = client.get("/metrics").text
    assert [r["text"] for r in replies] == torch_replies(tiny_gguf[0], 16)
    assert any(r["text"] for r in replies) and all(1 <= r["completion_tokens"] <= 16 for r in replies)
    assert health == {"status": "ok", "model_version": f"dir:{tiny_gguf[0].name}", "engine": "llama.cpp"}
    assert 'llm_engine_info{engine="llama.cpp",gguf_type="f16"} 1.0' in metrics
    assert f'llm_requests_total{{endpoint="generate",model_version="dir:{tiny_gguf[0].name}",status="200"}} 6.0' in metrics
    log = read_log(tmp_path / "data/serving").to_pylist()  # SIGTERM flushed it
    assert sorted((r["prompt"], r["response"].strip(), r["engine"], r["status"]) for r in log) == sorted(
        (p, r["text"], "llama.cpp", "ok") for p, r in zip(PROMPTS, replies))


def test_the_openai_client_streams_a_reply_and_seeded_sampling_repeats(tiny_gguf, tmp_path):
    with llama_server(tiny_gguf, tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", max_retries=0, timeout=60)
        chat = [{"role": "user", "content": PROMPTS[0]}]
        whole = client.chat.completions.create(model="llm-assets", messages=chat, max_tokens=12, temperature=0)
        chunks = list(client.chat.completions.create(model="llm-assets", messages=chat, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        sampled = [client.completions.create(model="llm-assets", prompt="def wrap(", max_tokens=8, temperature=0.8,
                                             top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # in pieces, as they came
    assert streamed == whole.choices[0].message.content and streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sampled[0] == sampled[1]
    assert [r["engine"] for r in read_log(tmp_path / "data/serving").to_pylist()] == ["llama.cpp"] * 4


def test_a_server_without_the_gguf_export_refuses_to_start_and_says_how_to_make_it(tiny_base_dir, tmp_path):
    with pytest.raises(RuntimeError) as e:  # the server process exited during start-up
        with ServerProcess(tmp_path, tiny_base_dir, ["--engine", "llama.cpp"]):
            pass
    missing = ProjectPaths(tmp_path).artifact("gguf_model") / "model-q8_0.gguf"
    assert f"no GGUF export at {missing}" in str(e.value)
    assert "llm-assets materialize --select gguf_model" in str(e.value)
