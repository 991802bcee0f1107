"""`dhad serve`: the ALLaM card's endpoint, the OpenAI API and a bilingual web chat over one engine.

    app = create_app("path/to/model_dir")        # or create_app(engine) / create_app(backend)
    uvicorn.run(app, **uvicorn_options(Limits()))  # `dhad serve --model DIR` does this

Endpoints (one module each; this file only wires them)
  POST /score                 routes_score: the card's schema {"input_data": {"input_string": [...],
                              "parameters": {...}}} -> {"output": "..."}; transformers' names and defaults
  POST /v1/chat/completions   routes_openai: OpenAI chat (``stream: true`` = server-sent events)
  POST /v1/completions        routes_openai: OpenAI text completion (raw prompt, no chat format)
  GET  /v1/models[/{id}]      routes_openai
  GET  /health, GET / (web chat)   routes_web

Design choices:
- The app is a thin layer: rendering the chat format, batching and sampling live in
  `dhad.prompts` / `dhad.engine`; `dhad.serve.service` validates, renders and tokenises (off the
  event loop, in a worker thread), submits, and turns engine events into text.
- One error path (`dhad.serve.errors`): every error -- ours, FastAPI's 422, Starlette's 404/405, an
  unparsable body, the body limit -- answers in OpenAI's ``{"error": {"message", "type", "param",
  "code"}}`` shape, quoting at most a bounded piece of the request. 422 schema violations (wrong
  types, unknown fields, NaN/Infinity, lone surrogates -- pydantic strict mode), 400 requests the
  model cannot serve (prompt longer than the context, max_new_tokens above the limit, roles out of
  order, unsupported options), 401 bad API key, 404 unknown model or path, 405 wrong method, 408 too
  slow to send, 413 body too large, 429 queue full (with Retry-After), 503 shutting down.
- What one request may cost is bounded (`dhad.serve.limits`): body size (413 before reading it),
  header and body read time (408), prompt characters (400 before tokenising).
- Client disconnects cancel the request: streaming responses are cancelled by Starlette, which
  closes our generator and the engine handle; non-streaming requests watch ``http.disconnect``.
  Either way the engine frees the row within one decode step.
- The API key is compared as UTF-8 bytes with `hmac.compare_digest` (constant time); header values
  arrive as latin-1 text (HTTP's bytes), so they are turned back into their bytes first. /health
  and the page itself are public; the page asks for the key when the server has one.
- The content filter (off by default) checks the input before generation and the output while it
  streams, releasing only text that can no longer turn into a blocked term.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time

from fastapi import Depends, FastAPI, Request

from dhad.serve import errors, routes_openai, routes_score, routes_web
from dhad.serve import schemas as S
from dhad.serve.backend import Backend, load_backend
from dhad.serve.errors import APIError
from dhad.serve.filters import ContentFilter
from dhad.serve.limits import BodyLimit, Limits, uvicorn_options
from dhad.serve.service import Service

__all__ = ["create_app", "BackgroundServer", "APIError", "Limits", "uvicorn_options"]

_ERRORS = {
    400: "the model cannot serve this request", 401: "missing or wrong API key", 404: "unknown model",
    408: "the request was not sent in time", 413: "request body too large", 422: "the request breaks the schema",
    429: "queue full: retry later", 503: "shutting down",
}


def _documented(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, all in OpenAI's error shape."""
    return {s: {"model": S.ErrorResponse, "description": _ERRORS[s]} for s in statuses}


def _key_check(api_key: str | None):
    """The auth dependency: Bearer token or X-API-Key, compared as bytes in constant time."""
    # A key from the command line may hold undecodable bytes (surrogateescape): keep them as they were.
    key = api_key.encode("utf-8", "surrogateescape") if api_key else None

    async def require_key(request: Request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        # Starlette decodes header bytes as latin-1, one character per byte: encoding back is exact.
        if not hmac.compare_digest(given.encode("latin-1"), key):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def create_app(engine_or_model_dir, *, fmt=None, model_name: str | None = None,
               api_key: str | None = None, content_filter: ContentFilter | None = None,
               max_new_tokens_limit: int = S.DEFAULT_MAX_NEW_TOKENS_LIMIT, max_batch_size: int = 8,
               max_queue: int = 64, dtype: str = "float32", device: str = "cpu", engine: str = "native",
               shutdown_engine: bool | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app over a model directory, an `Engine` (or VLLMEngine) or a `Backend`.

    ``fmt``: chat format name (default: the checkpoint's chat_template, else the family's).
    ``limits``: body size, read timeouts and prompt length (`dhad.serve.limits.Limits`; the
    header timeout takes effect through ``uvicorn_options(limits)``).

    A model directory is loaded here and its engine is started and stopped with the app (lifespan).
    A given engine is started if needed and left running at shutdown unless ``shutdown_engine``.
    ``api_key`` falls back to the DHAD_API_KEY environment variable.
    """
    if isinstance(engine_or_model_dir, Backend):
        backend, owns = engine_or_model_dir, False
    elif isinstance(engine_or_model_dir, (str, os.PathLike)):
        backend = load_backend(engine_or_model_dir, dtype=dtype, device=device, engine=engine, fmt=fmt,
                               model_name=model_name, max_batch_size=max_batch_size, max_queue=max_queue,
                               max_new_tokens_limit=max_new_tokens_limit)
        owns = True
    else:  # an Engine built with its tokenizer (it decodes text deltas with it)
        backend, owns = Backend.from_engine(engine_or_model_dir, fmt=fmt, model_name=model_name), False
    if shutdown_engine is not None:
        owns = shutdown_engine
    api_key = api_key if api_key is not None else (os.environ.get("DHAD_API_KEY") or None)
    limits = limits or Limits()
    svc = Service(backend, content_filter, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.engine.start()
        svc.draining = False
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests finished (or its graceful timeout);
            # wait=True lets anything still queued in the engine finish too.
            svc.draining = True
            if owns:
                await asyncio.to_thread(backend.engine.shutdown, True)

    app = FastAPI(title="dhad", version=_version(), lifespan=lifespan,
                  description="Bilingual Arabic-English LLM server: the ALLaM card's /score endpoint, "
                              "the OpenAI API and a web chat.")
    app.state.backend = backend
    app.state.service = svc
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    auth = [Depends(_key_check(api_key))]
    app.include_router(routes_web.router(svc))
    app.mount("/static", routes_web.static_files(), name="static")
    app.include_router(routes_openai.router(svc, auth, _documented))
    app.include_router(routes_score.router(svc, auth, _documented))
    return app


def _version() -> str:
    from dhad import __version__
    return __version__


class BackgroundServer:
    """uvicorn in a background thread (notebooks, tests): ``with BackgroundServer(app) as s: s.url``.

    ``port=0`` picks a free port. ``stop()`` is uvicorn's graceful shutdown: in-flight requests
    finish first, then the app's lifespan ends.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 10.0,
                 log_level: str = "warning"):
        import threading

        import uvicorn

        self.app = app
        svc = getattr(getattr(app, "state", None), "service", None)
        limits = svc.limits if svc is not None else Limits()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=graceful_timeout,
                                                    **uvicorn_options(limits)))
        self.thread = threading.Thread(target=self.server.run, name="dhad-serve", daemon=True)
        self.host = host
        self.url = ""

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start (see its log)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut uvicorn down and wait for its thread; RuntimeError if it is still running after ``timeout``."""
        self.server.should_exit = True
        if self.thread.ident is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not stop within {timeout:g} s")

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
