"""What one request may cost `dhad serve`: body size, time to send headers and body, prompt length.

    limits = Limits(max_body_bytes=8 << 20, header_timeout=10.0, body_timeout=30.0, max_prompt_chars=None)
    app = create_app(backend, limits=limits)
    uvicorn.run(app, **uvicorn_options(limits))        # `dhad serve` and `BackgroundServer` do this

- `BodyLimit` (ASGI middleware, outermost): a request whose Content-Length is above the limit gets
  413 at once, before any of its body is read; a chunked body is counted as it arrives and refused
  the moment it passes the limit. Either way the 413 says ``Connection: close``, so the server stops
  reading that connection instead of draining what the client still sends. The body is read here
  (bounded) and handed on, so a client that stalls mid-body for `body_timeout` seconds gets 408.
- `HeaderTimeoutH11Protocol` (uvicorn's h11 protocol plus one timer): a connection must finish its
  request line and headers within `header_timeout` seconds of opening (or of its previous response),
  else it is answered 408 and closed -- uvicorn's own keep-alive timeout stops counting as soon as
  one byte arrives, so a client sending a header byte every few seconds held a connection forever.
- ``max_prompt_chars`` bounds the text of one prompt before any rendering or tokenisation (checked
  by the routes, 400 ``context_length_exceeded``). None: 32 characters per token of the context, far
  above what text averages (3-5 characters per token), so a prompt refused by it cannot fit anyway.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
CHARS_PER_TOKEN_LIMIT = 32


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout: float = 10.0      # seconds to send the request line and headers
    body_timeout: float = 30.0        # seconds the body may stall between two chunks
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_LIMIT x the context

    def __post_init__(self):
        if self.max_body_bytes < 1 or self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("max_body_bytes must be >= 1 and the timeouts > 0")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")

    def prompt_chars(self, context: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * context


def _error_bytes(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = _error_bytes(message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: bodies above ``max_bytes`` get 413 before they are read; stalled bodies 408."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES, timeout: float = 30.0):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _too_large(self, send, size: str):
        return _send_error(send, 413, f"the request body is {size}; this server accepts at most "
                                      f"{self.max_bytes} bytes", "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else -1  # h11 already refuses malformed lengths
        if declared is not None and declared > self.max_bytes:
            return await self._too_large(send, f"{declared} bytes")
        if declared == 0 or (declared is None and scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                return await _send_error(send, 408, f"the request body stalled for {self.timeout:g} s",
                                         "request_timeout")
            if msg["type"] == "http.disconnect":
                return  # the client went away before sending its request
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request line and headers (see the module doc)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # nothing sent yet on this cycle: say why before closing
            body = _error_bytes(f"the request headers were not complete within {self.header_timeout:g} s",
                                "request_timeout")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() +
                                 b"\r\n\r\n" + body)
        self.transport.close()


def protocol_class(header_timeout: float) -> type:
    """The h11 protocol class with this header deadline (uvicorn builds one instance per connection)."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(header_timeout)})


def uvicorn_options(limits: Limits) -> dict:
    """Keyword arguments for `uvicorn.Config` that apply ``limits`` at the connection level."""
    return {"http": protocol_class(limits.header_timeout)}
