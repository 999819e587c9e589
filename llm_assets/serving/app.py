"""The model server: FastAPI over the released model, batched generation, every request logged and
counted, Prometheus metrics, OpenAI-compatible endpoints.

    >>> from llm_assets.serving.app import ServeSettings, create_app
    >>> settings = ServeSettings(model_dir="/srv/proj/data/lake/quantized_model", max_batch_size=8)
    >>> settings.model_dir.name, settings.max_new_tokens_cap, settings.max_body_bytes
    ('quantized_model', 128, 1048576)
    >>> app = create_app(settings)  # cheap: the model loads when the server starts
    >>> sorted(route.path for route in app.routes if not route.path.startswith(("/docs", "/redoc", "/openapi")))
    ['/generate', '/generate/stream', '/health', '/metrics', '/v1/chat/completions', '/v1/completions', '/v1/models']

`llm-assets serve` runs it with `serve(settings, host, port)` (uvicorn with a header read timeout);
tests/test_serving*.py drive it in-process and as that process.

Endpoints:
- `POST /generate` `{"prompt": str, "max_new_tokens": int, "temperature": float}` -> the reply, token
  counts, latency and model version. temperature 0 (or below 0.01) = greedy.
- `POST /generate/stream`: the same request; the reply as server-sent events (`data: {"text": ...}`
  per piece, then `data: {"done": true, ...}`).
- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`: OpenAI's API
  (serving/openai_api.py says what is supported).
- `GET /health`: status and the loaded model version.
- `GET /metrics`: Prometheus text: requests by endpoint, status and model version (4xx of every
  kind, 499 for clients that left), latency histogram, generated tokens, errors by reason, batch
  sizes, requests routed per version, and the latest drift report's figures.

The model is the release `data/releases/current.json` points at (or `--model DIR`). Each request
checks the pointer (one stat) and a new release is loaded before answering: no restart needed.
While the pointer names a canary, that share of requests goes to it (llm_assets/serving/routing.py);
the log, the metrics and the response name the version that answered.

Generation is batched (lib/release/batching.py): one engine per loaded model decodes up to
`max_batch_size` requests in each forward pass, with each request's own settings and the model
directory's generation_config.json (stop at `<|end|>`, repetition penalty, no-repeat n-gram).
With `engine` llama.cpp the GGUF export of the served model (`gguf_type`, from gguf_model) runs in
llama.cpp instead, one request at a time, choosing tokens the same way (lib/release/llama_engine.py);
the endpoints, limits, log and metrics are the same, and /health, the log's `engine` column and
`llm_engine_info` say which engine answered.

Limits, each a clear 4xx before any model work (serving/guards.py for the first four):
- a body over `max_body_bytes`: 413, answered from Content-Length without reading the body;
- a body that does not arrive within `body_timeout_s`: 408; headers not in within
  `header_timeout_s`: 408 and the connection closed;
- `api_key` set and no `Authorization: Bearer <key>`: 401 (`/health` and `/metrics` stay open);
- a prompt over `max_prompt_chars` characters (checked before tokenizing), or over
  `max_prompt_tokens` tokens, or `max_new_tokens` over `max_new_tokens_cap`: 422 (400 under /v1);
- temperature or top_p not a finite number in range: 422 (400 under /v1), never a 500;
- `max_queue` requests already waiting while the batch is full: 429. No release to load: 503.

Tokenizing runs on a pool of its own, so a flood of long prompts cannot hold up `/health` (which
uses the event loop's default pool). Every request that reaches the model is logged (status "ok",
the error class of a failed generation, or "client_disconnected") with the version that answered;
a client that disconnects cancels its generation, which frees its place in the batch. A failure
inside generation answers 500 on `/generate`, and on a stream whose 200 is already sent ends it
with an error event (`data: {"error": "generation failed: ..."}`; under /v1 OpenAI's error object).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from llm_assets.lib.common.paths import ProjectPaths, default_project_dir
from llm_assets.lib.monitor.serving_log import ServingLog
from llm_assets.lib.posttrain.chat_data import prompt_ids
from llm_assets.lib.release.batching import BatchEngine, GenerationRequest, QueueFull
from llm_assets.lib.release.llama_engine import LlamaCppEngine
from llm_assets.lib.release.release import pointer_path
from llm_assets.serving.drift_metrics import DriftCollector
from llm_assets.serving.guards import Guard, error_response, header_timeout_protocol
from llm_assets.serving.models import LoadedModel, Served, load_served
from llm_assets.serving.openai_api import add_openai_routes, sse
from llm_assets.serving.requests import ApiError, Ask, GenerationFailed, Ticket
from llm_assets.serving.routing import CanaryRouter

API_KEY_ENV = "LLM_ASSETS_API_KEY"
GENERATION_ENDPOINTS = ("generate", "stream", "chat_completions", "completions")
REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           408: "timeout", 413: "body_too_large", 422: "invalid_request", 429: "busy", 499: "client_disconnected"}


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
    engine: Literal["torch", "llama.cpp"] = Field("torch", description="What runs the model: torch (the model "
                                                  "directory, batched: lib/release/batching.py) or llama.cpp (the "
                                                  "GGUF export of that model, one request at a time: "
                                                  "lib/release/llama_engine.py).")
    gguf_type: Literal["f16", "q8_0", "q4_0"] = Field("q8_0", description="With engine llama.cpp: which GGUF file "
                                                      "of gguf_model is served (model-<type>.gguf).")
    gguf_dir: Path = Field(default_factory=lambda: ProjectPaths(default_project_dir()).artifact("gguf_model"),
                           description="With engine llama.cpp: gguf_model's directory; its export must be of the "
                           "served model (gguf.json's source: that model, or the model a quantized one quantized).")
    llama_threads: int = Field(1, ge=1, description="With engine llama.cpp: CPU threads llama.cpp decodes with.")
    max_prompt_tokens: int = Field(192, ge=1, description="Longest prompt accepted, in tokens with the chat template "
                                   "applied; a longer one gets 422.")
    max_prompt_chars: int = Field(16_384, ge=1, description="Longest prompt accepted, in characters (all messages), "
                                  "checked before tokenizing; well above what max_prompt_tokens tokens spell.")
    max_new_tokens_cap: int = Field(128, ge=1, description="Largest max_new_tokens a request may ask for; more gets 422.")
    max_batch_size: int = Field(16, ge=1, description="Requests decoded together in one forward pass.")
    max_queue: int = Field(64, ge=0, description="Requests waiting once the batch is full; one more gets 429.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body; a larger one gets 413 unread.")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds to receive a whole request body, else 408.")
    header_timeout_s: float = Field(10.0, gt=0, description="Seconds to receive a request's headers, else the "
                                    "connection is closed (with a 408).")
    api_key: str | None = Field(None, description=f"Bearer token every request but /health and /metrics must carry "
                                f"(`--api-key` or ${API_KEY_ENV}); none: no authentication (loopback use).")
    torch_threads: int = Field(1, ge=0, description="torch CPU threads of `llm-assets serve` (0: torch's default, "
                               "every core). Small models decode fastest on one: with two, the demo model served "
                               "16 clients 2.5x slower on a 2-core machine (benchmarks/serve_load.py).")
    log_flush_rows: int = Field(64, ge=1, description="Write a serving-log part once this many rows wait.")
    log_flush_seconds: float = Field(5.0, gt=0, description="Write a serving-log part once the oldest waiting row "
                                     "is this many seconds old.")


class GenerateRequest(BaseModel):
    model_config = {"extra": "forbid"}
    prompt: str = Field(min_length=1, description="The user message; the chat template is applied here.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False,
                               description="0 (or below 0.01) = greedy; otherwise sampling temperature.")



async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: only that message comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ModelServer:
    """The loaded models and their batching engines, the metrics and the serving log, and what each
    endpoint does with them. `create_app` routes HTTP to its methods."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.loaded = LoadedModel(settings)
        self.engines: dict[str, BatchEngine | LlamaCppEngine] = {}  # by model version: the release's, the canary's
        self._engines_lock = threading.Lock()
        # Tokenizing gets threads of its own: on the default pool a flood of long prompts starves /health.
        self.tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self.log: ServingLog | None = None  # opened at start-up, flushed and closed at shutdown
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_requests", "Requests by endpoint, HTTP status (499: the client left) and the "
                                "model version that answered", ["endpoint", "status", "model_version"], registry=r)
        self.latency = Histogram("llm_request_latency_seconds", "End-to-end latency of answered generations",
                                 ["endpoint", "model_version"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.tokens = Counter("llm_generated_tokens", "Tokens generated", ["model_version"], registry=r)
        self.errors = Counter("llm_errors", "Requests that failed (4xx and 5xx)", ["endpoint", "reason"], registry=r)
        self.batch_size = Histogram("llm_batch_size", "Requests decoded together, per forward pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        # which runtime answers (llm_engine_info{engine=...} 1), beside the other series, which keep their labels
        Info("llm_engine", "The engine running the model, and the GGUF type it serves with llama.cpp",
             registry=r).info({"engine": settings.engine, "gguf_type": settings.gguf_type if self.llama_cpp else ""})
        # the canary named by the release pointer, if any, and its share of requests (serving/routing.py)
        self.router = CanaryRouter(None if settings.model_dir else settings.releases_dir,
                                   partial(load_served, settings=settings), r)
        r.register(DriftCollector(settings.drift_dir))  # llm_drift_* gauges, read at each scrape

    @property
    def llama_cpp(self) -> bool:
        return self.settings.engine == "llama.cpp"

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        s = self.settings
        self.log = ServingLog(s.log_dir, s.log_flush_rows, s.log_flush_seconds)
        await asyncio.to_thread(self.loaded.refresh)  # fail at start, not on the first request, if a release is broken
        try:
            yield
        finally:
            for engine in list(self.engines.values()):
                engine.close(timeout=10)
            self.log.close()  # uvicorn runs this on SIGTERM/SIGINT: nothing buffered is lost
            self.tokenize_pool.shutdown(wait=False)

    @staticmethod
    def fail(status: int, reason: str, message: str, param: str | None = None):
        raise ApiError(status, reason, message, param)

    def count(self, endpoint: str, status: int, state: dict, seconds: float) -> None:
        """Every request, once (serving/guards.py calls it when the response has ended or broken off)."""
        version = state.get("model_version", "none")
        self.requests.labels(endpoint, str(status), version).inc()
        if status >= 400:
            self.errors.labels(endpoint, state.get("error_reason") or REASONS.get(status, f"http_{status}")).inc()
        elif endpoint in GENERATION_ENDPOINTS:
            self.latency.labels(endpoint, version).observe(seconds)

    def prepare(self, ask: Ask) -> tuple[list[int], Served]:
        """The prompt's token ids and the release to answer with, or the 503/422 that says why not
        (on the tokenize pool: loading a release and tokenizing are work)."""
        s = self.settings
        served = self.loaded.refresh()
        if served is None:
            self.fail(503, "no_model", f"no release to serve: {pointer_path(s.releases_dir)} does not exist")
        served = self.router.route(served)
        tok = served.tokenizer
        ids = (prompt_ids(tok, ask.messages) if ask.messages is not None
               else [tok.eos_token_id, *tok(ask.text, add_special_tokens=False)["input_ids"]])
        if len(ids) > s.max_prompt_tokens:
            self.fail(422, "prompt_too_long", f"prompt is {len(ids)} tokens with the chat template, over the cap of "
                      f"{s.max_prompt_tokens}", "messages" if ask.messages is not None else "prompt")
        return ids, served

    def check(self, ask: Ask) -> None:
        """The limits that need no tokenizer, checked first."""
        s = self.settings
        chars = sum(len(m["content"]) for m in ask.messages) if ask.messages is not None else len(ask.text)
        if chars > s.max_prompt_chars:
            self.fail(422, "prompt_too_long", f"prompt is {chars} characters, over the cap of {s.max_prompt_chars}",
                      "messages" if ask.messages is not None else "prompt")
        if ask.max_new_tokens > s.max_new_tokens_cap:
            self.fail(422, "max_new_tokens", f"max_new_tokens {ask.max_new_tokens} is over the cap of "
                      f"{s.max_new_tokens_cap}", "max_tokens")

    def engine_for(self, served: Served) -> BatchEngine | LlamaCppEngine:
        """The engine of a loaded model (settings.engine's kind); engines of models no longer served are retired."""
        s = self.settings
        with self._engines_lock:
            engine = self.engines.get(served.version)
            if engine is None or engine.model is not served.model or engine.closed:
                engine = (LlamaCppEngine(served.model, served.tokenizer, s.max_queue, on_step=self.batch_size.observe)
                          if self.llama_cpp else BatchEngine(served.model, served.tokenizer, s.max_batch_size,
                                                             s.max_queue, on_step=self.batch_size.observe))
                self.engines[served.version] = engine
            live = {m.version for m in (self.loaded.current, self.router.canary, served) if m is not None}
            for version in [v for v in self.engines if v not in live]:
                self.engines.pop(version).close(timeout=0)  # it ends once its requests are answered
        return engine

    async def admit(self, request: Request, ask: Ask) -> Ticket:
        """Checks, release and tokens, then a place in the engine's queue (429 when it is full)."""
        self.check(ask)
        ids, served = await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, self.prepare, ask)
        request.state.model_version = served.version
        ticket = Ticket(ask, served, ids)
        wanted = GenerationRequest(ids, ask.max_new_tokens, ask.temperature, ask.top_p, ask.seed, ask.stop, ask.stream)
        try:
            ticket.seq = self.engine_for(served).submit(wanted, ticket.on_event)
        except QueueFull as e:
            self.fail(429, "busy", str(e))
        return ticket

    def finish(self, ticket: Ticket, status: str) -> None:
        """Log the request with the version that answered, and count its tokens."""
        n = ticket.completion_tokens
        self.tokens.labels(ticket.served.version).inc(n)
        self.log.append({"time": datetime.now(timezone.utc), "request_id": uuid.uuid4().hex,
                         "prompt": ticket.ask.log_prompt, "response": ticket.seq.text, "prompt_tokens": len(ticket.ids),
                         "response_tokens": n, "latency_seconds": time.perf_counter() - ticket.start,
                         "model_version": ticket.served.version, "status": status, "engine": self.settings.engine})

    async def outcome(self, request: Request, ticket: Ticket):
        """The reply's pieces as they come; the request is logged and counted however it ends: done,
        failed (GenerationFailed, re-raised), or the client gone (its generation cancelled)."""
        status = "client_disconnected"
        try:
            async for piece in ticket.pieces():
                yield piece
            status = "ok"
        except GenerationFailed as e:
            status = str(e).split(":")[0]
            request.state.status, request.state.error_reason = 500, "generation_error"
            raise
        finally:
            if status == "client_disconnected":
                ticket.seq.cancel()
                request.state.status, request.state.error_reason = 499, "client_disconnected"
            self.finish(ticket, status)

    async def complete(self, request: Request, ticket: Ticket) -> bool:
        """Wait for the whole reply; False when the client left first (its generation is cancelled)."""

        async def drain():
            async for _ in self.outcome(request, ticket):
                pass

        reply, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_client_gone(request))
        await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not reply.done():
            reply.cancel()
            with suppress(asyncio.CancelledError):
                await reply
            return False
        try:
            reply.result()
        except GenerationFailed as e:
            self.fail(500, "generation_error", f"generation failed: {e}")
        return True

    def ask_generate(self, req: GenerateRequest, endpoint: str) -> Ask:
        return Ask(endpoint, req.prompt, [{"role": "user", "content": req.prompt}], None, req.max_new_tokens,
                   req.temperature, stream=endpoint == "stream")

    async def generate(self, req: GenerateRequest, request: Request):
        ticket = await self.admit(request, self.ask_generate(req, "generate"))
        if not await self.complete(request, ticket):
            return Response(status_code=499)
        return {"text": ticket.seq.text.strip(), "prompt_tokens": len(ticket.ids),
                "completion_tokens": ticket.completion_tokens, "latency_seconds": time.perf_counter() - ticket.start,
                "model_version": ticket.served.version}

    async def stream(self, req: GenerateRequest, request: Request):
        ticket = await self.admit(request, self.ask_generate(req, "stream"))

        async def events():
            try:
                async for piece in self.outcome(request, ticket):
                    yield sse({"text": piece})
            except GenerationFailed as e:
                yield sse({"error": f"generation failed: {e}"})
                return
            yield sse({"done": True, "completion_tokens": ticket.completion_tokens,
                       "model_version": ticket.served.version})

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(self):
        served = await asyncio.to_thread(self.loaded.refresh)
        return {"status": "ok" if served is not None else "no_model", "model_version": served and served.version,
                "engine": self.settings.engine}

    async def metrics(self):
        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def api_error(self, request: Request, exc: ApiError):
        request.state.error_reason = exc.reason
        return error_response(request.url.path, exc.status, exc.message, exc.reason, exc.param)

    async def invalid(self, request: Request, exc: RequestValidationError):
        """Malformed JSON, wrong types, out-of-range or non-finite numbers: 422 naming the field (400
        in OpenAI's shape under /v1). The offending input is left out of the answer: NaN and
        Infinity cannot be written as JSON, and a 10 MB prompt should not be echoed."""
        request.state.error_reason = "invalid_request"
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        if request.url.path.startswith("/v1/"):
            first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
            param = ".".join(str(p) for p in first["loc"][1:]) or None
            return error_response(request.url.path, 400, f"{param}: {first['msg']}" if param else first["msg"],
                                  "invalid_request", param)
        return JSONResponse({"detail": errors}, 422)


def create_app(settings: ServeSettings) -> FastAPI:
    server = ModelServer(settings)
    app = FastAPI(title="llm-assets model server", lifespan=server.lifespan)
    app.post("/generate")(server.generate)
    app.post("/generate/stream")(server.stream)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    add_openai_routes(app, server)
    app.add_exception_handler(RequestValidationError, server.invalid)
    app.add_exception_handler(ApiError, server.api_error)
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                       api_key=settings.api_key, count=server.count)
    app.state.server = server
    return app


def uvicorn_config(app: FastAPI, settings: ServeSettings, host: str = "127.0.0.1", port: int = 0, **kw):
    """uvicorn's config for the app: the h11 protocol with the header read timeout."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=header_timeout_protocol(settings.header_timeout_s), **kw)


def serve(settings: ServeSettings, host: str, port: int) -> None:
    """Run the server until SIGTERM/SIGINT (uvicorn's graceful shutdown flushes the request log)."""
    import uvicorn

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    config = uvicorn_config(create_app(settings), settings, host, port, log_level="info")  # sets up logging
    if (warning := exposure_warning(host, settings.api_key)) is not None:
        logging.getLogger("uvicorn.error").warning(warning)
    uvicorn.Server(config).run()


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about when the server would be reachable from other machines with no API key."""
    if api_key or host == "localhost":
        return None
    with suppress(ValueError):  # not an address: a host name may resolve anywhere
        if ipaddress.ip_address(host).is_loopback:
            return None
    return (f"binding {host}, reachable from other machines, with no API key: anyone who can reach it can use "
            f"the model; pass --api-key or set {API_KEY_ENV}")
