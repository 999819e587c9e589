"""What a request is once an endpoint has read it: the `Ask` (whichever API it came through), the
`Ticket` of an admitted one in the batching engine, and the errors that answer it."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from llm_assets.serving.models import Served


class ApiError(Exception):
    """A request the server will not or cannot answer: status, metrics reason, message, field."""

    def __init__(self, status: int, reason: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.param = status, reason, message, param


class GenerationFailed(Exception):
    """Generation raised inside the engine; the message starts with the error class."""


class Ask(NamedTuple):
    """What an endpoint asks of the model, whichever API it came through."""

    endpoint: str  # the metrics label
    log_prompt: str  # what the serving log records as the prompt: the (last) user message
    messages: list[dict] | None  # a chat, rendered with the project's chat template
    text: str | None  # or plain text to continue
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False  # the reply is sent as it comes (else all at once: no event per token)


class Ticket:
    """An admitted request: its sequence in the batching engine and the events it sends back."""

    def __init__(self, ask: Ask, served: Served, ids: list[int]):
        self.ask, self.served, self.ids = ask, served, ids
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.start = time.perf_counter()
        self.seq = None

    def on_event(self, kind: str, value) -> None:
        """Called on the engine's thread: hand the event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (shutdown): nobody is waiting any more
            self.seq.cancel()

    async def pieces(self):
        """The reply's text as it comes; GenerationFailed when the engine reports an error."""
        while True:
            kind, value = await self.queue.get()
            if kind == "text":
                yield value
            elif kind == "done":
                return
            else:
                raise GenerationFailed(value)

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.generated)
