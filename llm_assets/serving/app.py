"""The model server: FastAPI over the released model, every request logged, Prometheus metrics.

    >>> from llm_assets.serving.app import ServeSettings, create_app
    >>> settings = ServeSettings(model_dir="/srv/proj/data/lake/quantized_model", max_concurrent=4)
    >>> settings.model_dir.name, settings.max_new_tokens_cap
    ('quantized_model', 128)
    >>> app = create_app(settings)  # cheap: the model loads when the server starts
    >>> sorted(route.path for route in app.routes if not route.path.startswith(("/docs", "/redoc", "/openapi")))
    ['/generate', '/generate/stream', '/health', '/metrics']

`llm-assets serve` runs it with `uvicorn.run(app, host=..., port=...)`; tests/test_serving.py drives it
in-process and as that process.

Endpoints:
- `POST /generate` `{"prompt": str, "max_new_tokens": int, "temperature": float}` -> the reply, token
  counts, latency and model version. temperature 0 = greedy.
- `POST /generate/stream`: the same request; the reply as server-sent events (`data: {"text": ...}`
  per piece, then `data: {"done": true, ...}`).
- `GET /health`: status and the loaded model version.
- `GET /metrics`: Prometheus text: requests by endpoint and status, latency histogram, generated
  tokens, errors, requests routed per version, and the latest drift report's figures.

The model is the release `data/releases/current.json` points at (or `--model DIR`). Each request
checks the pointer (one stat) and a new release is loaded before answering: no restart needed.
While the pointer names a canary, that share of requests goes to it (llm_assets/serving/routing.py);
the log and `llm_routed_requests_total` name the version that answered.

Limits, each a clear 4xx: a prompt longer than `max_prompt_tokens` or a `max_new_tokens` above
`max_new_tokens_cap` get 422 with the numbers; malformed JSON and wrong types get FastAPI's 422
naming the field; when `max_concurrent` generations run and a slot does not free within
`queue_timeout_s`, 429. No release to load: 503.

Both generation endpoints go through one path, `ModelServer.run`: a failure inside generation is
logged (status = the error class) and counted (status 500, reason `generation_error`) the same way
on both. `/generate` answers it with a 500; the stream, whose 200 is already sent, ends with
`data: {"error": "generation failed: ..."}`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch
from fastapi import FastAPI, HTTPException
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from llm_assets.lib.common.paths import ProjectPaths, default_project_dir
from llm_assets.lib.monitor.serving_log import ServingLog
from llm_assets.lib.posttrain.chat_data import end_token_id, prompt_ids
from llm_assets.lib.release.release import current_release, pointer_path
from llm_assets.serving.drift_metrics import DriftCollector
from llm_assets.serving.routing import CanaryRouter


class ServeSettings(BaseModel):
    """How the server runs; `llm-assets serve` builds it from its flags and the project directory."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    releases_dir: Path = Field(default_factory=lambda: ProjectPaths(default_project_dir()).releases,
                               description="Holds the release pointer current.json; the release it points at is served.")
    log_dir: Path = Field(default_factory=lambda: ProjectPaths(default_project_dir()).serving,
                          description="The serving log: every answered request, as Parquet parts.")
    drift_dir: Path = Field(default_factory=lambda: ProjectPaths(default_project_dir()).artifact("drift_report"),
                            description="drift_report's directory: its latest figures are exported at /metrics.")
    model_dir: Path | None = Field(None, description="Serve this model directory instead of the current release.")
    max_prompt_tokens: int = Field(192, ge=1, description="Longest prompt accepted, in tokens with the chat template "
                                   "applied; a longer one gets 422.")
    max_new_tokens_cap: int = Field(128, ge=1, description="Largest max_new_tokens a request may ask for; more gets 422.")
    max_concurrent: int = Field(2, ge=1, description="Generations at once (one per core on a 2-core machine); "
                                "other requests wait for a slot.")
    queue_timeout_s: float = Field(30.0, gt=0, description="Seconds a request waits for a generation slot before 429.")
    log_flush_rows: int = Field(64, ge=1, description="Write a serving-log part once this many rows wait.")
    log_flush_seconds: float = Field(5.0, gt=0, description="Write a serving-log part once the oldest waiting row "
                                     "is this many seconds old.")


class GenerateRequest(BaseModel):
    model_config = {"extra": "forbid"}
    prompt: str = Field(min_length=1, description="The user message; the chat template is applied here.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy; otherwise sampling temperature.")


class Served(NamedTuple):
    """One loaded release; replaced as a whole, so a request never mixes two releases."""

    model: Any
    tokenizer: Any
    version: str


def load_served(path: Path, version: str) -> Served:
    """A release's model and tokenizer, warmed up, ready to answer (the release and a canary alike)."""
    from transformers import AutoTokenizer

    from llm_assets.lib.release.quantize import load_for_inference

    model = load_for_inference(path)
    # One forward before any request: bitsandbytes repacks 4-bit weights for CPU inference
    # in place on the first eval forward, and two requests doing that at once corrupt them.
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[0, 1]], device=next(model.parameters()).device))
    return Served(model, AutoTokenizer.from_pretrained(path), version)


class LoadedModel:
    """The model being served and where it came from; swapped when the release pointer moves."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.current: Served | None = None
        self._pointer_stamp = None
        self._lock = threading.Lock()

    def _source(self) -> tuple[Path, str] | None:
        if self.settings.model_dir is not None:
            return Path(self.settings.model_dir), f"dir:{Path(self.settings.model_dir).name}"
        release = current_release(self.settings.releases_dir)
        return (Path(release["path"]), release["version"]) if release else None

    def refresh(self) -> Served | None:
        """Load the current release if it is not the one loaded (a stat per call when unchanged)."""
        pointer = pointer_path(Path(self.settings.releases_dir))
        stamp = pointer.stat().st_mtime_ns if pointer.is_file() else None
        if self.current is not None and (self.settings.model_dir is not None or stamp == self._pointer_stamp):
            return self.current
        with self._lock:
            source = self._source()
            if source is None or (self.current is not None and source[1] == self.current.version):
                self._pointer_stamp = stamp
                return self.current
            self.current = load_served(*source)
            self._pointer_stamp = stamp
            return self.current


def sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


class ModelServer:
    """The loaded model, the generation slots, the metrics and the serving log, and what each endpoint
    does with them. `create_app` routes HTTP to its methods."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.loaded = LoadedModel(settings)
        self.slots = asyncio.Semaphore(settings.max_concurrent)
        # Generations get threads of their own, one per slot: on the default executor they could queue
        # behind the stream readers that wait for them.
        self.pool = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="generate")
        self.streams: set[asyncio.Task] = set()  # running stream generations (asyncio keeps only weak refs)
        self.log: ServingLog | None = None  # opened at start-up, flushed and closed at shutdown
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("llm_request_latency_seconds", "End-to-end generation latency", ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.tokens = Counter("llm_generated_tokens", "Tokens generated", registry=r)
        self.errors = Counter("llm_errors", "Requests that failed (4xx and 5xx)", ["endpoint", "reason"], registry=r)
        # the canary named by the release pointer, if any, and its share of requests (serving/routing.py)
        self.router = CanaryRouter(None if settings.model_dir else settings.releases_dir, load_served, r)
        r.register(DriftCollector(settings.drift_dir))  # llm_drift_* gauges, read at each scrape

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        s = self.settings
        self.log = ServingLog(s.log_dir, s.log_flush_rows, s.log_flush_seconds)
        await asyncio.to_thread(self.loaded.refresh)  # fail at start, not on the first request, if a release is broken
        try:
            yield
        finally:
            self.log.close()  # uvicorn runs this on SIGTERM/SIGINT: nothing buffered is lost
            self.pool.shutdown(wait=False)

    def fail(self, endpoint: str, status: int, reason: str, message: str):
        self.requests.labels(endpoint, str(status)).inc()
        self.errors.labels(endpoint, reason).inc()
        raise HTTPException(status_code=status, detail=message)

    def prepare(self, req: GenerateRequest, endpoint: str) -> tuple[list[int], Served]:
        """The prompt's token ids and the release to answer with, or the 503/422 that says why not."""
        s = self.settings
        served = self.loaded.refresh()
        if served is None:
            self.fail(endpoint, 503, "no_model", f"no release to serve: {pointer_path(s.releases_dir)} does not exist")
        served = self.router.route(served)
        if req.max_new_tokens > s.max_new_tokens_cap:
            self.fail(endpoint, 422, "max_new_tokens", f"max_new_tokens {req.max_new_tokens} is over the cap of {s.max_new_tokens_cap}")
        ids = prompt_ids(served.tokenizer, [{"role": "user", "content": req.prompt}])
        if len(ids) > s.max_prompt_tokens:
            self.fail(endpoint, 422, "prompt_too_long", f"prompt is {len(ids)} tokens with the chat template, over the cap of {s.max_prompt_tokens}")
        return ids, served

    async def admit(self, req: GenerateRequest, endpoint: str) -> tuple[list[int], Served]:
        """prepare(), then a generation slot (429 when none frees in time); run() gives the slot back."""
        ids, served = await asyncio.to_thread(self.prepare, req, endpoint)
        s = self.settings
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=s.queue_timeout_s)
        except TimeoutError:
            self.fail(endpoint, 429, "busy", f"all {s.max_concurrent} generation slots stayed busy for {s.queue_timeout_s} s; retry later")
        return ids, served

    def record(self, req: GenerateRequest, response: str, prompt_n: int, new_n: int, seconds: float, version: str,
               endpoint: str, status: str = "ok"):
        if status == "ok":
            self.tokens.inc(new_n)
            self.latency.labels(endpoint).observe(seconds)
            self.requests.labels(endpoint, "200").inc()
        self.log.append({"time": datetime.now(timezone.utc), "request_id": uuid.uuid4().hex, "prompt": req.prompt,
                         "response": response, "prompt_tokens": prompt_n, "response_tokens": new_n,
                         "latency_seconds": seconds, "model_version": version, "status": status})

    @staticmethod
    def new_tokens(req: GenerateRequest, ids: list[int], served: Served, streamer=None) -> torch.Tensor:
        """The generated token ids (1-D), on a pool thread; a streamer gets the text as it comes."""
        tok, sample = served.tokenizer, req.temperature > 0
        x = torch.tensor([ids], device=next(served.model.parameters()).device)
        with torch.no_grad():
            out = served.model.generate(
                x, attention_mask=torch.ones_like(x), streamer=streamer, max_new_tokens=req.max_new_tokens,
                do_sample=sample, temperature=req.temperature if sample else None, top_p=None, top_k=None,
                eos_token_id=[end_token_id(tok), tok.eos_token_id], pad_token_id=tok.pad_token_id)
        return out[0, len(ids):]

    async def run(self, req: GenerateRequest, endpoint: str, ids: list[int], served: Served, streamer=None) -> dict:
        """The one generation path of both endpoints, on an admitted request: generate, give the slot
        back, log and count the outcome. A failure is logged with its error class and raised as a 500."""
        start = time.perf_counter()
        try:
            new = await asyncio.get_running_loop().run_in_executor(self.pool, self.new_tokens, req, ids, served, streamer)
        except Exception as e:  # logged and counted, then a 500 that says what broke
            if streamer is not None:
                streamer.end()  # generate() raised before ending the stream: wake its reader
            self.record(req, "", len(ids), 0, time.perf_counter() - start, served.version, endpoint, type(e).__name__)
            self.fail(endpoint, 500, "generation_error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            self.slots.release()
        seconds = time.perf_counter() - start
        text = served.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.record(req, text, len(ids), len(new), seconds, served.version, endpoint)
        return {"text": text, "prompt_tokens": len(ids), "completion_tokens": len(new),
                "latency_seconds": seconds, "model_version": served.version}

    async def generate(self, req: GenerateRequest):
        return await self.run(req, "generate", *await self.admit(req, "generate"))

    async def stream(self, req: GenerateRequest):
        from transformers import TextIteratorStreamer

        ids, served = await self.admit(req, "stream")
        streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
        # A task of its own: a client that disconnects mid-stream stops reading, not the generation,
        # which still frees its slot and is logged when it ends.
        reply = asyncio.create_task(self.run(req, "stream", ids, served, streamer))
        self.streams.add(reply)
        reply.add_done_callback(self.streams.discard)
        return StreamingResponse(self.events(streamer, reply), media_type="text/event-stream")

    async def events(self, streamer, reply: asyncio.Task):
        """Each piece of text as the model writes it, then the totals, or the error run() raised."""
        while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
            if piece:
                yield sse({"text": piece})
        try:
            done = await reply
        except HTTPException as e:  # already logged and counted by run(); the 200 went out with the first byte
            yield sse({"error": e.detail})
            return
        yield sse({"done": True, "completion_tokens": done["completion_tokens"], "model_version": done["model_version"]})

    async def health(self):
        served = await asyncio.to_thread(self.loaded.refresh)
        return {"status": "ok" if served is not None else "no_model", "model_version": served and served.version}

    async def metrics(self):
        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def invalid(self, request, exc: RequestValidationError):
        """FastAPI answers malformed JSON and wrong types with 422 before our handlers run: count those too."""
        endpoint = "stream" if request.url.path.endswith("/stream") else "generate"
        self.requests.labels(endpoint, "422").inc()
        self.errors.labels(endpoint, "invalid_request").inc()
        return await request_validation_exception_handler(request, exc)


def create_app(settings: ServeSettings) -> FastAPI:
    server = ModelServer(settings)
    app = FastAPI(title="llm-assets model server", lifespan=server.lifespan)
    app.post("/generate")(server.generate)
    app.post("/generate/stream")(server.stream)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.add_exception_handler(RequestValidationError, server.invalid)
    app.state.server = server
    return app
