"""OpenAI-compatible endpoints beside `/generate`: what the `openai` SDK, LangChain and tools that
follow OpenAI's API reference send and expect.

    >>> from llm_assets.serving.openai_api import ChatCompletionRequest, error_body
    >>> req = ChatCompletionRequest(model="any", messages=[{"role": "user", "content": "Explain f()."}], max_tokens=8)
    >>> req.max_new_tokens(cap=128), req.stops(), req.temperature
    (8, (), 1.0)
    >>> error_body("n: only n=1 is supported", 400, "invalid_request", "n")
    {'error': {'message': 'n: only n=1 is supported', 'type': 'invalid_request_error', 'param': 'n', 'code': 'invalid_request'}}

- `GET /v1/models`: the release being served (and the canary while there is one); ids are versions.
- `POST /v1/chat/completions`: `messages` rendered with the project's chat template
  (chat_data.prompt_ids, what the model was tuned on); the reply stops at `<|end|>`.
- `POST /v1/completions`: `prompt` continued as plain text after the document boundary (`<eos>`).
- Both take `max_tokens` (chat also `max_completion_tokens`; default and cap: the server's
  `max_new_tokens_cap`), `temperature` (0-2, default 1 as OpenAI; below 0.01 greedy), `top_p`,
  `stop` (up to 4 strings), `seed`, `n` (only 1: other values are refused, 400), `stream` (OpenAI's
  server-sent chunks, then `data: [DONE]`; `stream_options.include_usage` adds a usage chunk),
  `user` (ignored). Unknown fields are refused with 400 naming them, rather than silently ignored.
- `model` is not checked: the server answers with the release it serves (or the canary), and the
  response's `model` names the version that answered.
- Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; a request the
  server cannot take is 400 (where `/generate` says 422), so the SDK raises `BadRequestError`. An
  error after a stream has started arrives as a chunk `{"error": {...}}`, which the SDK raises.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from llm_assets.serving.requests import Ask, GenerationFailed

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(message: str, status: int, code: str, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = {"extra": "forbid"}
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = {"extra": "forbid"}
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = {"extra": "forbid"}
    model: str = Field(description="Echoed by nothing: the response names the version that answered.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default: the server's cap).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 (or below 0.01): greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    n: int = Field(1, description="Choices per request: only 1.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings the reply ends before.")
    seed: int | None = Field(None, description="Sampling seed: the same request and seed give the same reply.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (got {n}): send one request per choice")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop strings, none empty")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def max_new_tokens(self, cap: int) -> int:
        return self.max_tokens if self.max_tokens is not None else cap

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")

    def max_new_tokens(self, cap: int) -> int:
        return self.max_completion_tokens or super().max_new_tokens(cap)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, description="Text to continue (one prompt: n and batches of prompts are 1).")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """The response bodies and stream chunks of one request, chat or text completion."""

    def __init__(self, chat: bool, version: str):
        self.chat, self.version = chat, version
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _frame(self, choices: list, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.version, "choices": choices}

    def body(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish_reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
        return {**self._frame([choice], self.object), "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, piece: str | None = None, finish_reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse(self._frame([choice], "chat.completion.chunk"))
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}
        return sse(self._frame([choice], "text_completion"))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._frame([], obj), "usage": usage(prompt_tokens, completion_tokens)})


def sse(event: dict | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


DONE = sse("[DONE]")


def add_openai_routes(app, server) -> None:
    """`/v1/models`, `/v1/chat/completions` and `/v1/completions` on the app, answered by the
    server's one generation path (app.ModelServer: admit, complete, outcome)."""

    cap = server.settings.max_new_tokens_cap

    async def models(request: Request):
        served = await asyncio.to_thread(server.loaded.refresh)
        found = [m for m in (served, server.router.canary) if m is not None]
        return {"object": "list", "data": [{"id": m.version, "object": "model", "created": 0, "owned_by": "llm-assets"}
                                           for m in found]}

    async def chat(req: ChatCompletionRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        return await answer(request, req, Ask("chat_completions", last_user, messages, None, req.max_new_tokens(cap),
                                              req.temperature, req.top_p, req.seed, req.stops(), req.stream))

    async def completions(req: CompletionRequest, request: Request):
        return await answer(request, req, Ask("completions", req.prompt, None, req.prompt, req.max_new_tokens(cap),
                                              req.temperature, req.top_p, req.seed, req.stops(), req.stream))

    async def answer(request: Request, req: _Sampling, ask):
        ticket = await server.admit(request, ask)
        shapes = Shapes(ask.messages is not None, ticket.served.version)
        if req.stream:
            return StreamingResponse(chunks(request, req, ticket, shapes), media_type="text/event-stream")
        if not await server.complete(request, ticket):
            return Response(status_code=499)  # nobody reads it: counted and logged as the client gone
        return shapes.body(ticket.seq.text, ticket.seq.finish_reason, len(ticket.ids), ticket.completion_tokens)

    async def chunks(request: Request, req: _Sampling, ticket, shapes: Shapes):
        if shapes.chat:
            yield shapes.chunk(first=True)
        try:
            async for piece in server.outcome(request, ticket):
                yield shapes.chunk(piece)
        except GenerationFailed as e:  # the 200 is out: OpenAI's error object as a chunk, which the SDK raises
            yield sse(error_body(f"generation failed: {e}", 500, "generation_error"))
            return
        yield shapes.chunk(finish_reason=ticket.seq.finish_reason)
        if req.include_usage():
            yield shapes.usage_chunk(len(ticket.ids), ticket.completion_tokens)
        yield DONE

    app.get("/v1/models")(models)
    app.post("/v1/chat/completions")(chat)
    app.post("/v1/completions")(completions)
