"""The model server: FastAPI over the released model, every request logged, Prometheus metrics.

    app = create_app(ServeSettings(releases_dir=Path("data/releases"), log_dir=Path("data/serving")))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # what `llm-assets serve` does

Endpoints:
- `POST /generate` `{"prompt": str, "max_new_tokens": int, "temperature": float}` -> the reply, token
  counts, latency and model version. temperature 0 = greedy.
- `POST /generate/stream`: the same request; the reply as server-sent events (`data: {"text": ...}`
  per piece, then `data: {"done": true, ...}`).
- `GET /health`: status and the loaded model version.
- `GET /metrics`: Prometheus text: requests by endpoint and status, latency histogram, generated
  tokens, errors.

The model is the release `data/releases/current.json` points at (or `--model DIR`). Each request
checks the pointer (one stat) and a new release is loaded before answering: no restart needed.

Limits, each a clear 4xx: a prompt longer than `max_prompt_tokens` or a `max_new_tokens` above
`max_new_tokens_cap` get 422 with the numbers; malformed JSON and wrong types get FastAPI's 422
naming the field; when `max_concurrent` generations run and a slot does not free within
`queue_timeout_s`, 429. No release to load: 503.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from llm_assets.lib.posttrain.chat_data import end_token_id, prompt_ids
from llm_assets.lib.release.release import current_release
from llm_assets.lib.monitor.serving_log import ServingLog


@dataclass
class ServeSettings:
    releases_dir: Path = Path("data/releases")
    log_dir: Path = Path("data/serving")
    model_dir: Path | None = None  # serve this directory instead of the current release
    max_prompt_tokens: int = 192  # the prompt, chat template included
    max_new_tokens_cap: int = 128
    max_concurrent: int = 2  # generations at once (one per core on a 2-core machine)
    queue_timeout_s: float = 30.0  # how long a request waits for a generation slot before 429
    log_flush_rows: int = 64
    log_flush_seconds: float = 5.0


class GenerateRequest(BaseModel):
    model_config = {"extra": "forbid"}
    prompt: str = Field(min_length=1, description="The user message; the chat template is applied here.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy; otherwise sampling temperature.")


class LoadedModel:
    """The model being served and where it came from; swapped when the release pointer moves."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model = self.tokenizer = None
        self.version, self._pointer_stamp = None, None
        self._lock = threading.Lock()

    def _source(self) -> tuple[Path, str] | None:
        if self.settings.model_dir is not None:
            return Path(self.settings.model_dir), f"dir:{Path(self.settings.model_dir).name}"
        release = current_release(self.settings.releases_dir)
        return (Path(release["path"]), release["version"]) if release else None

    def refresh(self) -> None:
        """Load the current release if it is not the one loaded (a stat per call when unchanged)."""
        pointer = Path(self.settings.releases_dir) / "current.json"
        stamp = pointer.stat().st_mtime_ns if pointer.is_file() else None
        if self.model is not None and (self.settings.model_dir is not None or stamp == self._pointer_stamp):
            return
        with self._lock:
            source = self._source()
            if source is None or source[1] == self.version:
                self._pointer_stamp = stamp
                return
            path, version = source
            from transformers import AutoTokenizer

            from llm_assets.lib.release.quantize import load_for_inference

            model = load_for_inference(path)
            # One forward before any request: bitsandbytes repacks 4-bit weights for CPU inference
            # in place on the first eval forward, and two requests doing that at once corrupt them.
            with torch.no_grad():
                model.eval()(input_ids=torch.tensor([[0, 1]], device=next(model.parameters()).device))
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model, self.version, self._pointer_stamp = model, version, stamp


def create_app(settings: ServeSettings) -> FastAPI:
    registry = CollectorRegistry()
    requests = Counter("llm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=registry)
    latency = Histogram("llm_request_latency_seconds", "End-to-end generation latency", ["endpoint"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
    tokens = Counter("llm_generated_tokens", "Tokens generated", registry=registry)
    errors = Counter("llm_errors", "Requests that failed (4xx and 5xx)", ["endpoint", "reason"], registry=registry)
    loaded = LoadedModel(settings)
    log: dict[str, ServingLog] = {}
    slots = asyncio.Semaphore(settings.max_concurrent)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log["log"] = ServingLog(settings.log_dir, settings.log_flush_rows, settings.log_flush_seconds)
        await asyncio.to_thread(loaded.refresh)  # fail at start, not on the first request, if a release is broken
        try:
            yield
        finally:
            log["log"].close()  # uvicorn runs this on SIGTERM/SIGINT: nothing buffered is lost

    app = FastAPI(title="llm-assets model server", lifespan=lifespan)

    def fail(endpoint: str, status: int, reason: str, message: str):
        requests.labels(endpoint, str(status)).inc()
        errors.labels(endpoint, reason).inc()
        raise HTTPException(status_code=status, detail=message)

    def prepare(req: GenerateRequest, endpoint: str) -> list[int]:
        loaded.refresh()
        if loaded.model is None:
            fail(endpoint, 503, "no_model", f"no release to serve: {settings.releases_dir / 'current.json'} does not exist")
        if req.max_new_tokens > settings.max_new_tokens_cap:
            fail(endpoint, 422, "max_new_tokens", f"max_new_tokens {req.max_new_tokens} is over the cap of {settings.max_new_tokens_cap}")
        ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": req.prompt}])
        if len(ids) > settings.max_prompt_tokens:
            fail(endpoint, 422, "prompt_too_long", f"prompt is {len(ids)} tokens with the chat template, over the cap of {settings.max_prompt_tokens}")
        return ids

    def generation_kwargs(req: GenerateRequest) -> dict:
        tok = loaded.tokenizer
        sample = req.temperature > 0
        return dict(max_new_tokens=req.max_new_tokens, do_sample=sample, temperature=req.temperature if sample else None,
                    top_p=None, top_k=None, eos_token_id=[end_token_id(tok), tok.eos_token_id], pad_token_id=tok.pad_token_id)

    async def acquire(endpoint: str) -> None:
        try:
            await asyncio.wait_for(slots.acquire(), timeout=settings.queue_timeout_s)
        except TimeoutError:
            fail(endpoint, 429, "busy", f"all {settings.max_concurrent} generation slots stayed busy for {settings.queue_timeout_s} s; retry later")

    def record(req: GenerateRequest, response: str, prompt_n: int, new_n: int, seconds: float, version: str,
               endpoint: str, status: str = "ok"):
        if status == "ok":
            tokens.inc(new_n)
            latency.labels(endpoint).observe(seconds)
            requests.labels(endpoint, "200").inc()
        log["log"].append({"time": datetime.now(timezone.utc), "request_id": uuid.uuid4().hex, "prompt": req.prompt,
                           "response": response, "prompt_tokens": prompt_n, "response_tokens": new_n,
                           "latency_seconds": seconds, "model_version": version, "status": status})

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        ids = await asyncio.to_thread(prepare, req, "generate")
        await acquire("generate")
        try:
            model, tok, version = loaded.model, loaded.tokenizer, loaded.version
            start = time.perf_counter()

            def run():
                x = torch.tensor([ids], device=next(model.parameters()).device)
                with torch.no_grad():
                    return model.generate(x, attention_mask=torch.ones_like(x), **generation_kwargs(req))[0, len(ids):]

            try:
                new = await asyncio.to_thread(run)
            except Exception as e:  # logged and counted, then a 500 that says what broke
                record(req, "", len(ids), 0, time.perf_counter() - start, version, "generate", type(e).__name__)
                fail("generate", 500, "generation_error", f"generation failed: {type(e).__name__}: {e}")
            seconds = time.perf_counter() - start
        finally:
            slots.release()
        text = tok.decode(new, skip_special_tokens=True).strip()
        record(req, text, len(ids), len(new), seconds, version, "generate")
        return {"text": text, "prompt_tokens": len(ids), "completion_tokens": len(new),
                "latency_seconds": seconds, "model_version": version}

    @app.post("/generate/stream")
    async def generate_stream(req: GenerateRequest):
        from transformers import TextIteratorStreamer

        ids = await asyncio.to_thread(prepare, req, "stream")
        await acquire("stream")
        model, tok, version = loaded.model, loaded.tokenizer, loaded.version
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
        counted: dict[str, int] = {}

        def run():
            x = torch.tensor([ids], device=next(model.parameters()).device)
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), streamer=streamer, **generation_kwargs(req))
            counted["new"] = out.shape[1] - len(ids)

        async def events():
            start, pieces = time.perf_counter(), []
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                while True:
                    piece = await asyncio.to_thread(next, streamer, None)
                    if piece is None:
                        break
                    if piece:
                        pieces.append(piece)
                        yield f"data: {json.dumps({'text': piece})}\n\n"
                await asyncio.to_thread(worker.join)
                seconds = time.perf_counter() - start
                text = "".join(pieces).strip()
                record(req, text, len(ids), counted.get("new", 0), seconds, version, "stream")
                yield f"data: {json.dumps({'done': True, 'completion_tokens': counted.get('new', 0), 'model_version': version})}\n\n"
            finally:
                slots.release()  # also when the client disconnects mid-stream

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        await asyncio.to_thread(loaded.refresh)
        return {"status": "ok" if loaded.model is not None else "no_model", "model_version": loaded.version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # FastAPI answers malformed JSON and wrong types with 422 before our handlers run: count those too.
    from fastapi.exceptions import RequestValidationError
    from fastapi.exception_handlers import request_validation_exception_handler

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        endpoint = "stream" if request.url.path.endswith("/stream") else "generate"
        requests.labels(endpoint, "422").inc()
        errors.labels(endpoint, "invalid_request").inc()
        return await request_validation_exception_handler(request, exc)

    app.state.loaded = loaded
    app.state.log = log
    return app
