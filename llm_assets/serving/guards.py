"""What stands between the network and the model server: read limits, timeouts, the API key, and a
count of every response.

`Guard` is ASGI middleware around the FastAPI app. For each HTTP request, before any route runs:
- an API key, when one is set: every path but `/health` and `/metrics` needs
  `Authorization: Bearer <key>`, else 401;
- the body: a `Content-Length` over `max_body_bytes` is answered 413 without reading the body; a
  body without one is read up to the limit (413 past it); a body that does not arrive in full
  within `body_timeout_s` gets 408 (a client that announces 999999 bytes and sends ten);
- after the app answers, `count(endpoint, status, state, seconds)` is called once per request: 4xx
  from routing (404, 405), parsing, the guard itself and the handlers alike. A response whose body
  stopped before its end (the client went away mid-stream) counts as 499; a handler can set
  `request.state.status` to count what the stream turned out to be (500 after a generation error).

`header_timeout_protocol(seconds)` is uvicorn's h11 protocol with a timeout on the request line and
headers (uvicorn has none: a client sending half a header held the connection forever): the
connection gets `408` and is closed. Pass it as `uvicorn.Config(http=...)`.

Error bodies: OpenAI's error object under `/v1/`, `{"detail": message}` elsewhere (as FastAPI's).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from starlette.responses import JSONResponse

from llm_assets.serving.openai_api import error_body

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key: probes and Prometheus scrape them
ENDPOINTS = {"/generate": "generate", "/generate/stream": "stream", "/health": "health", "/metrics": "metrics",
             "/v1/models": "models", "/v1/chat/completions": "chat_completions", "/v1/completions": "completions"}


def endpoint_of(path: str) -> str:
    """The metrics label of a path: a known endpoint, else "other" (unknown paths must not make labels)."""
    return ENDPOINTS.get(path.rstrip("/") or "/", "other")


def error_response(path: str, status: int, message: str, code: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    if path.startswith("/v1/"):
        return JSONResponse(error_body(message, 400 if status == 422 else status, code, param),
                            400 if status == 422 else status, headers=headers)
    return JSONResponse({"detail": message}, status, headers=headers)


class Guard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, api_key: str | None,
                 count: Callable[[str, int, dict, float], None]):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.api_key, self.count = api_key, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        scope.setdefault("state", {})
        sent = {"status": 0, "complete": False}

        async def watched_send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        try:
            refusal = self._refusal(scope)
            body = None if refusal is not None else await self._read_body(scope, receive)
            if isinstance(body, JSONResponse):
                refusal = body
            if refusal is not None:
                await refusal(scope, receive, watched_send)
            elif body is not None:
                await self.app(scope, _replay(body, receive), watched_send)
        except Exception:
            sent.update(status=500, complete=True)  # Starlette answers it with a 500 outside this middleware
            raise
        finally:
            status = scope["state"].get("status") or (sent["status"] if sent["complete"] else 499)
            self.count(endpoint_of(path), status, scope["state"], time.perf_counter() - start)

    def _refusal(self, scope) -> JSONResponse | None:
        """401 or 413 from the headers alone."""
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                scope["state"]["error_reason"] = "unauthorized"
                return error_response(path, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                                      "invalid_api_key", headers={"www-authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            scope["state"]["error_reason"] = "body_too_large"
            return error_response(path, 413, f"request body of {length.decode('latin-1')} bytes is over the "
                                  f"limit of {self.max_body_bytes} bytes", "body_too_large",
                                  headers={"connection": "close"})
        return None

    async def _read_body(self, scope, receive) -> bytes | JSONResponse | None:
        """The whole body within the time and size limits; None when the client left."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                scope["state"]["error_reason"] = "body_timeout"
                return error_response(scope["path"], 408, f"request body not received within {self.body_timeout_s} s",
                                      "body_timeout", headers={"connection": "close"})
            if message["type"] == "http.disconnect":
                scope["state"].setdefault("error_reason", "client_disconnected")
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                scope["state"]["error_reason"] = "body_too_large"
                return error_response(scope["path"], 413, f"request body is over the limit of {self.max_body_bytes} "
                                      "bytes", "body_too_large", headers={"connection": "close"})
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the app the body read already, then the server's messages (the
    disconnect that stops a generation)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol class with a time limit on reading a request's line and headers."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer = self.loop.call_later(seconds, self._too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE  # the request line and headers are not all in yet
            if not waiting and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            elif waiting and self._timer is None and self.conn.trailing_data[0]:
                self._timer = self.loop.call_later(seconds, self._too_slow)  # a next request, begun

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.warning("request headers not received within %s s: connection closed", seconds)
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return HeaderTimeoutProtocol
