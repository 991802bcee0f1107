"""`dhad serve`: the ALLaM card's endpoint, the OpenAI API and a bilingual web chat over one engine.

    app = create_app("path/to/model_dir")        # or create_app(engine) / create_app(backend)
    uvicorn.run(app)                              # `dhad serve --model DIR` does this

Endpoints
  POST /score                 the card's schema: {"input_data": {"input_string": [...], "parameters": {...}}}
                              -> {"output": "..."}; transformers' parameter names and defaults
  POST /v1/chat/completions   OpenAI chat (``stream: true`` = server-sent events ending ``data: [DONE]``)
  POST /v1/completions        OpenAI text completion (raw prompt, no chat format)
  GET  /v1/models, GET /health, GET / (web chat)

Design choices:
- The app is a thin layer: rendering the chat format, batching and sampling live in
  `dhad.prompts` / `dhad.engine`; the app validates, submits, and turns engine events into JSON.
- Clear 4xx errors, in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape so the
  official client raises them with their message: 422 schema violations (wrong types, unknown
  fields — pydantic strict mode), 400 requests the model cannot serve (prompt longer than the
  context, max_new_tokens above the limit, roles out of order, unsupported options), 401 bad API
  key, 404 unknown model, 429 queue full (with Retry-After), 503 shutting down.
- Client disconnects cancel the request: streaming responses are cancelled by Starlette, which
  closes our generator and the engine handle; non-streaming requests watch ``http.disconnect``.
  Either way the engine frees the row within one decode step.
- The API key is compared with `hmac.compare_digest` (constant time). /health and the page itself
  are public; the page asks for the key when the server has one.
- The content filter (off by default) checks the input before generation and the output while it
  streams, releasing only text that can no longer turn into a blocked term.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from dhad import prompts
from dhad.engine import EngineClosed, QueueFull, RequestError
from dhad.generate import SamplingParams
from dhad.serve import schemas as S
from dhad.serve.backend import Backend, load_backend
from dhad.serve.filters import ContentFilter

STATIC_DIR = Path(str(resources.files("dhad.serve") / "static"))
# The page loads only its own files; nothing inline, nothing from elsewhere (no CDN: no network).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_ERRORS = {
    400: {"model": S.ErrorResponse, "description": "the model cannot serve this request"},
    401: {"model": S.ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": S.ErrorResponse, "description": "unknown model"},
    429: {"model": S.ErrorResponse, "description": "queue full: retry later"},
    503: {"model": S.ErrorResponse, "description": "shutting down"},
}


# ---------------------------------------------------------------------------------------------
# One generation: streaming, content filter, usage


class _Run:
    """Consumes one engine request; yields text deltas and records finish reason and usage."""

    def __init__(self, handle, content_filter: ContentFilter | None):
        self.handle = handle
        self.filter = content_filter
        self.text = ""      # text released to the client
        self._pending = ""  # generated text the filter has not released yet
        self.finish_reason: str | None = None
        self.prompt_tokens = len(handle.prompt_ids)
        self.completion_tokens = 0
        self.error: str | None = None

    def _release(self, final: bool) -> str:
        full = self.text + self._pending
        if self.filter is None:
            upto = len(full)
        else:
            hit = self.filter.find(full, start=len(self.text))  # what was released was checked
            if hit is not None:
                self.finish_reason = "content_filter"
                self.handle.cancel()
                upto = max(len(self.text), hit.start)
                out = full[len(self.text):upto]
                self.text, self._pending = full[:upto], ""
                return out
            upto = len(full) if final else max(len(self.text), self.filter.safe_prefix(full))
        out = full[len(self.text):upto]
        self.text, self._pending = full[:upto], full[upto:]
        return out

    async def deltas(self):
        try:
            async with contextlib.aclosing(self.handle.__aiter__()) as events:
                async for ev in events:
                    self.completion_tokens = ev.completion_tokens
                    self._pending += ev.text
                    out = self._release(final=ev.finished)
                    if out:
                        yield out
                    if self.finish_reason == "content_filter":
                        return
                    if ev.finished:
                        self.finish_reason = ev.finish_reason
                        if ev.finish_reason == "error":
                            self.error = ev.error or "generation failed"
                        return
        finally:
            if not self.handle.done:  # client went away / filter hit: free the engine row
                self.handle.cancel()

    async def collect(self, request: Request) -> str:
        """The whole answer; cancels the request if the client disconnects first."""
        async def consume():
            async for _ in self.deltas():
                pass

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():  # disconnected: nobody will read the answer
            self.handle.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # Nobody will read this; uvicorn drops it. (nginx's 499 "client closed request".)
            raise APIError(499, "client disconnected", "client_closed_request")
        task.result()
        if self.error:
            raise APIError(500, f"generation failed: {self.error}", "server_error")
        return self.text

    @property
    def usage(self) -> S.Usage:
        return S.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       total_tokens=self.prompt_tokens + self.completion_tokens)


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


# ---------------------------------------------------------------------------------------------
# The app


def create_app(engine_or_model_dir, *, fmt=None, model_name: str | None = None,
               api_key: str | None = None, content_filter: ContentFilter | None = None,
               max_new_tokens_limit: int = S.DEFAULT_MAX_NEW_TOKENS_LIMIT, max_batch_size: int = 8,
               max_queue: int = 64, dtype: str = "float32", device: str = "cpu", engine: str = "native",
               shutdown_engine: bool | None = None) -> FastAPI:
    """The FastAPI app over a model directory, an `Engine` (or VLLMEngine) or a `Backend`.

    ``fmt``: chat format name (default: the checkpoint's chat_template, else the family's).

    A model directory is loaded here and its engine is started and stopped with the app (lifespan).
    A given engine is started if needed and left running at shutdown unless ``shutdown_engine``.
    ``api_key`` falls back to the DHAD_API_KEY environment variable.
    """
    if isinstance(engine_or_model_dir, Backend):
        backend = engine_or_model_dir
        owns = False
    elif isinstance(engine_or_model_dir, (str, os.PathLike)):
        backend = load_backend(engine_or_model_dir, dtype=dtype, device=device, engine=engine, fmt=fmt,
                               model_name=model_name, max_batch_size=max_batch_size, max_queue=max_queue,
                               max_new_tokens_limit=max_new_tokens_limit)
        owns = True
    else:  # an Engine built with its tokenizer (it decodes text deltas with it)
        backend = Backend.from_engine(engine_or_model_dir, fmt=fmt, model_name=model_name)
        owns = False
    if shutdown_engine is not None:
        owns = shutdown_engine
    api_key = api_key if api_key is not None else (os.environ.get("DHAD_API_KEY") or None)
    key_bytes = api_key.encode("utf-8") if api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.engine.start()
        app.state.draining = False
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests finished (or its graceful timeout);
            # wait=True lets anything still queued in the engine finish too.
            app.state.draining = True
            if owns:
                await asyncio.to_thread(backend.engine.shutdown, True)

    app = FastAPI(title="dhad", version=_version(), lifespan=lifespan,
                  description="Bilingual Arabic-English LLM server: the ALLaM card's /score endpoint, "
                              "the OpenAI API and a web chat.")
    app.state.backend = backend
    app.state.content_filter = content_filter
    app.state.draining = False

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(_error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        body = _error_body("; ".join(parts) + more, "invalid_request_error", param, first.get("type"))
        body["detail"] = json.loads(json.dumps(errs, default=str))  # FastAPI's usual shape too
        return JSONResponse(body, status_code=422)

    # -- auth --------------------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        if key_bytes is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode("utf-8"), key_bytes):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    # -- helpers -----------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != backend.model_name:
            raise APIError(404, f"model {name!r} is not served here (this server serves {backend.model_name!r})",
                           param="model", code="model_not_found")

    def check_input(messages_or_text) -> None:
        f = app.state.content_filter
        if f is None:
            return
        texts = [messages_or_text] if isinstance(messages_or_text, str) else [m["content"] for m in messages_or_text]
        for t in texts:
            hit = f.find(t)
            if hit is not None:
                raise APIError(400, "the request was blocked by the server's content filter", param="messages",
                               code="content_filter")

    def chat_ids(messages: list[dict]) -> list[int]:
        try:
            return backend.chat_prompt(messages)
        except prompts.PromptError as e:
            raise APIError(400, str(e), param="messages") from None

    def make_params(base: SamplingParams, given: dict, stops: bool) -> SamplingParams:
        """``given``: transformers-named overrides; the limit and the context are checked here so
        the message names the request's own parameter."""
        mnt = given.get("max_new_tokens")
        if mnt is not None and mnt > backend.max_new_tokens_limit:
            raise APIError(400, f"max_new_tokens={mnt} is above this server's limit of {backend.max_new_tokens_limit}",
                           param="max_new_tokens", code="max_new_tokens_above_limit")
        try:
            if stops:
                return backend.chat_params(base, **given)
            return SamplingParams.from_kwargs(base, **given)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def submit(ids: list[int], params: SamplingParams):
        if app.state.draining:
            raise APIError(503, "server is shutting down", "server_error", code="shutting_down")
        if len(ids) >= backend.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {backend.context} tokens "
                                f"(at most {backend.context - 1} leave room for an answer)",
                           param="messages", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        try:
            return backend.engine.submit(ids, params)
        except QueueFull as e:
            raise APIError(429, f"server busy, retry later: {e}", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, f"server is shutting down: {e}", "server_error", code="shutting_down") from None
        except RequestError as e:
            raise APIError(400, str(e)) from None

    def openai_params(req: S._SamplingFields, default_max: int) -> tuple[SamplingParams, dict]:
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty "
                                "(transformers' multiplicative penalty)", param="presence_penalty")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        max_new = getattr(req, "max_completion_tokens", None) or req.max_tokens
        temperature = 1.0 if req.temperature is None else req.temperature
        given = {"max_new_tokens": max_new if max_new is not None else min(default_max, backend.max_new_tokens_limit),
                 # OpenAI semantics: sampling unless temperature is 0; no top-k unless asked for.
                 "do_sample": temperature > 0, "temperature": temperature if temperature > 0 else 1.0,
                 "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": req.top_k or 0}
        for k_ours, v in (("repetition_penalty", req.repetition_penalty), ("min_new_tokens", req.min_tokens),
                          ("seed", req.seed)):
            if v is not None:
                given[k_ours] = v
        if req.stop is not None:
            given["stop_strings"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        return SamplingParams(), given

    # -- routes ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=S.Health, responses={503: {"model": S.Health, "description": "not serving"}})
    async def health():
        """200 while the engine serves; 503 once it is shutting down or stopped (take it out of rotation)."""
        st = backend.engine.stats()
        ok = bool(st.get("running")) and not st.get("closing") and not app.state.draining
        body = S.Health(status="ok" if ok else "unavailable", model=backend.model_name,
                        running=st.get("active"), queued=st.get("queued"))
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/v1/models", response_model=S.ModelList, dependencies=auth, responses={401: _ERRORS[401]})
    async def models():
        return S.ModelList(data=[S.ModelCard(id=backend.model_name, created=_STARTED, max_model_len=backend.context)])

    @app.post("/score", response_model=S.ScoreResponse, dependencies=auth,
              responses={k: _ERRORS[k] for k in (400, 401, 429, 503)})
    async def score(req: S.ScoreRequest, request: Request):
        """The ALLaM card's endpoint: transformers' generation parameters, answer as ``output``."""
        messages = [m.model_dump() for m in req.input_data.input_string]
        check_input(messages)
        given = req.input_data.parameters.model_dump(exclude_none=True)
        if "stop" in given:
            stop = given.pop("stop")
            given["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if "stop_token_ids" in given:
            given["stop_token_ids"] = tuple(given["stop_token_ids"])
        if given.get("do_sample") and given.get("temperature") == 0:
            raise APIError(400, "temperature must be > 0 when do_sample is true (for greedy decoding set "
                                "do_sample=false)", param="temperature")
        if "max_length" in given and "max_new_tokens" not in given:
            given["max_new_tokens"] = None  # transformers: max_length alone bounds the total length
        elif "max_new_tokens" not in given and \
                (backend.defaults.max_new_tokens or 0) > backend.max_new_tokens_limit:
            given["max_new_tokens"] = backend.max_new_tokens_limit  # the default must respect the limit
        params = make_params(backend.defaults, given, stops=True)
        run = _Run(submit(chat_ids(messages), params), app.state.content_filter)
        return S.ScoreResponse(output=await run.collect(request))

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, dependencies=auth,
              responses={**{k: _ERRORS[k] for k in (400, 401, 404, 429, 503)},
                         200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        check_input(messages)
        base, given = openai_params(req, default_max=backend.context)
        params = make_params(base, given, stops=True)
        run = _Run(submit(chat_ids(messages), params), app.state.content_filter)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if not req.stream:
            text = await run.collect(request)
            return S.ChatCompletion(id=cid, created=created, model=backend.model_name, usage=run.usage, choices=[
                S.ChatChoice(index=0, message=S.AssistantMessage(content=text), finish_reason=run.finish_reason)])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish=None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": backend.model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for delta in run.deltas():
                yield chunk({"content": delta})
            if run.error:
                yield _sse(_error_body(f"generation failed: {run.error}", "server_error"))
            else:
                yield chunk({}, run.finish_reason)
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": backend.model_name, "choices": [], "usage": run.usage.model_dump()})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=S.Completion, dependencies=auth,
              responses={**{k: _ERRORS[k] for k in (400, 401, 404, 429, 503)},
                         200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
    async def completions(req: S.CompletionRequest, request: Request):
        check_model(req.model)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        check_input(prompt)
        base, given = openai_params(req, default_max=16)  # OpenAI's default max_tokens for completions
        params = make_params(base, given, stops=False)
        run = _Run(submit(backend.encode(prompt, add_special_tokens=True), params), app.state.content_filter)
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        prefix = prompt if req.echo else ""
        if not req.stream:
            text = await run.collect(request)
            return S.Completion(id=cid, created=created, model=backend.model_name, usage=run.usage, choices=[
                S.CompletionChoice(index=0, text=prefix + text, finish_reason=run.finish_reason)])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text: str, finish=None) -> bytes:
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": backend.model_name,
                         "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

        async def events():
            if prefix:
                yield chunk(prefix)
            async for delta in run.deltas():
                yield chunk(delta)
            if run.error:
                yield _sse(_error_body(f"generation failed: {run.error}", "server_error"))
            else:
                yield chunk("", run.finish_reason)
            if include_usage:
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": backend.model_name,
                            "choices": [], "usage": run.usage.model_dump()})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


_STARTED = int(time.time())


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
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=graceful_timeout))
        self.thread = threading.Thread(target=self.server.run, name="dhad-serve", daemon=True)
        self.host = host
        self.url = ""

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see its log)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
