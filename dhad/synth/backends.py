"""Teacher backends for translation and synthesis (`dhad data translate|synth`): one async ``chat(messages)``.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", model="x", concurrency=16)   # vLLM, `dhad serve`, hosted
    backend = EngineBackend.from_dir("out/model", max_batch_size=16)                # a dhad model, in process
    text = await backend.chat([{"role": "user", "content": "..."}], GenParams(max_tokens=256))
    backend.close()

Design choices:
- One method, ``chat``: translation and distillation both send a conversation and want one answer,
  so the callers never know which backend they talk to.
- Concurrency is a semaphore inside the backend: the callers may start as many coroutines as they
  like (a book is thousands of chunks); at most ``concurrency`` requests are in flight. That is what
  lets a continuous-batching server (vLLM, `dhad serve`, the in-process engine) fill its batch.
- Failures are sorted by what to do about them, not by where they came from:
  * transient (HTTP 429, 5xx, timeouts, connection errors, malformed bodies): retried with
    exponential backoff and jitter (``backoff * 2**attempt``, capped; a 429's ``Retry-After`` is
    honoured), every one counted in `BackendStats.errors` by kind;
  * the request's own fault (other 4xx, e.g. a prompt longer than the context): `RequestFailed`
    at once, no retry — the caller counts the document as skipped, a rerun tries it again;
  * the endpoint is unusable (401/403/404, or it has never answered and the retries ran out, or
    ``max_failed_in_row`` requests failed in a row — the message quotes the last failure, HTTP
    status and body included): `BackendUnavailable`, which stops the run with a message naming the
    URL — retrying each of a million documents against a dead endpoint would only hide the problem.
- Without a model name, the OpenAI backend asks ``GET /models`` once per run, with the same
  retries, and every request waits for that one lookup: concurrent requests never queue up to
  repeat it (a dead endpoint costs one lookup's timeouts, not one per request).
- The engine backend renders the conversation with the model's chat format (`dhad.prompts`), adds
  the format's turn-ending stop strings (as `dhad.generate.generate_text` does) and awaits the
  engine's async stream, so the event loop never blocks on generation.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["GenParams", "BackendStats", "BackendError", "RequestFailed", "BackendUnavailable", "OpenAIBackend",
           "EngineBackend", "run_bounded"]


@dataclass
class GenParams:
    """What a caller asks of the teacher (OpenAI names; the engine maps them to transformers')."""
    max_tokens: int = 512
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class BackendStats:
    """Counts for the run report: attempts, successes, retries and each error kind."""
    requests: int = 0                 # attempts sent (retries included)
    ok: int = 0
    retries: int = 0
    failed: int = 0                   # requests given up on (RequestFailed raised)
    errors: Counter = field(default_factory=Counter)   # http_429, http_5xx, timeout, connect, malformed, http_4xx
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0               # wall time with at least one request in flight

    def to_dict(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "retries": self.retries, "failed": self.failed,
                "errors": dict(sorted(self.errors.items())), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "busy_s": round(self.busy_s, 3)}


class BackendError(RuntimeError):
    """Base class; ``kind`` is the report key of the last failure."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


class RequestFailed(BackendError):
    """This request could not be answered (after retries when the failure was transient)."""


class BackendUnavailable(BackendError):
    """The backend cannot serve any request: stop the run (bad URL / key, an endpoint that never answers)."""


class _Transient(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


class _Base:
    """Concurrency limit, retry loop, failure accounting; subclasses implement ``_once``."""

    name = "backend"

    def __init__(self, concurrency: int = 8, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_failed_in_row: int = 8, seed: int = 0):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_failed_in_row = max_failed_in_row
        self.stats = BackendStats()
        self._sem: asyncio.Semaphore | None = None
        self._loop = None
        self._rng = random.Random(seed)   # jitter only; never affects outputs
        self._failed_in_row = 0
        self._ever_ok = False
        self._inflight = 0
        self._busy_since = 0.0

    def _semaphore(self) -> asyncio.Semaphore:
        # asyncio objects (and httpx connections) belong to the loop that made them: a backend reused by
        # a second `asyncio.run` (a resumed run in the same process) makes fresh ones.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._sem = asyncio.Semaphore(self.concurrency)
            self._new_loop()
        return self._sem

    def _new_loop(self) -> None:
        pass

    async def end_loop(self) -> None:
        """Release what belongs to the current event loop (HTTP connections); the backend stays usable."""

    def close(self) -> None:
        """Release everything (stop the engine). Call outside any running event loop."""

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff))
        return d

    async def _retrying(self, op):
        """``await op()`` with retries on `_Transient` failures (each counted); the last one is re-raised."""
        last: _Transient | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(attempt - 1, last.retry_after if last else None))
            self.stats.requests += 1
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1
            try:
                return await op()
            except _Transient as e:
                self.stats.errors[e.kind] += 1
                last = e
            except BackendError as e:
                self.stats.errors[e.kind] += 1
                raise
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self.stats.busy_s += time.perf_counter() - self._busy_since
        raise last

    def _gave_up(self, last: _Transient, what: str = "") -> BackendUnavailable | None:
        """BackendUnavailable when the endpoint has never answered (timeouts / refused connections only)."""
        if not self._ever_ok and last.kind in ("timeout", "connect"):
            return BackendUnavailable(f"{self.describe()} never answered{what}: {self.max_retries + 1} attempts, "
                                      f"last {last.kind}: {last.detail}", last.kind)
        return None

    async def _ready(self) -> None:
        """Anything the backend must know before its first request (the OpenAI model name)."""

    async def chat(self, messages: list[dict], params: GenParams | None = None) -> str:
        """The teacher's answer to ``messages`` (retried on transient failures)."""
        params = params or GenParams()
        sem = self._semaphore()
        await self._ready()
        async with sem:
            try:
                text = await self._retrying(lambda: self._once(messages, params))
            except _Transient as last:
                self.stats.failed += 1
                if (dead := self._gave_up(last)) is not None:
                    raise dead from None
                msg = f"{self.describe()}: gave up after {self.max_retries + 1} attempts (last: {last.kind}: {last.detail})"
                self._note_failure(msg, last.kind)
                raise RequestFailed(msg, last.kind) from None
            except RequestFailed as e:
                self.stats.failed += 1
                self._note_failure(str(e), e.kind)
                raise
            self.stats.ok += 1
            self._ever_ok = True
            self._failed_in_row = 0
            return text

    def _note_failure(self, msg: str = "", kind: str = "error") -> None:
        self._failed_in_row += 1
        if self.max_failed_in_row and self._failed_in_row >= self.max_failed_in_row:
            raise BackendUnavailable(f"{self.describe()}: {self._failed_in_row} requests in a row failed; "
                                     f"stopping (last: {msg or kind})", kind)

    async def _once(self, messages: list[dict], params: GenParams) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    @property
    def teacher(self) -> str:
        """What answered: the model id (recorded in synthesized rows and the reports)."""
        return self.name



# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint (vLLM, `dhad serve`, hosted APIs)

class OpenAIBackend(_Base):
    """``POST {base_url}/chat/completions`` over httpx with retries and a concurrency limit.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1`` (a URL without a path gets
    ``/v1``). ``model`` None asks ``GET /models`` once and uses the first model listed.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 8, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_failed_in_row: int = 8, transport=None):
        super().__init__(concurrency, max_retries, backoff, max_backoff, max_failed_in_row)
        import httpx
        from urllib.parse import urlparse

        u = urlparse(base_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"endpoint {base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        if u.path in ("", "/"):
            base_url = base_url.rstrip("/") + "/v1"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client_kw = dict(headers=headers, timeout=httpx.Timeout(timeout),
                               limits=httpx.Limits(max_connections=concurrency + 2,
                                                   max_keepalive_connections=concurrency + 2),
                               transport=transport, trust_env=False)
        self._client = None
        self._model_lookup: asyncio.Future | None = None

    def describe(self) -> str:
        return f"endpoint {self.base_url}"

    @property
    def teacher(self) -> str:
        return self.model or self.base_url   # the model id once known (given, or from GET /models)

    def _http(self):
        import httpx
        if self._client is None:
            self._client = httpx.AsyncClient(**self._client_kw)
        return self._client

    async def _request(self, method: str, path: str, body: dict | None = None):
        """One HTTP exchange -> parsed JSON object; failures mapped to the three kinds above."""
        import httpx
        url = self.base_url + path
        try:
            r = await self._http().request(method, url, json=body)
        except httpx.TimeoutException as e:
            raise _Transient("timeout", f"no answer within {self.timeout}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Transient("connect", f"{type(e).__name__}: {e}") from None
        if r.status_code == 429 or r.status_code >= 500:
            kind = "http_429" if r.status_code == 429 else "http_5xx"
            ra = r.headers.get("retry-after")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            raise _Transient(kind, f"HTTP {r.status_code}: {r.text[:200]}", ra)
        if r.status_code in (401, 403, 404):
            raise BackendUnavailable(f"{url}: HTTP {r.status_code} ({r.text[:200]}); check the URL, --teacher-model "
                                     "and the API key", f"http_{r.status_code}")
        if r.status_code >= 400:
            raise RequestFailed(f"{url}: HTTP {r.status_code}: {r.text[:300]}", "http_4xx")
        try:
            data = r.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise _Transient("malformed", f"{url}: body is not JSON: {r.text[:120]!r}") from None
        if not isinstance(data, dict):
            raise _Transient("malformed", f"{url}: JSON body is not an object")
        return data

    async def _ready(self) -> None:
        if self.model:
            return
        if self._model_lookup is None:   # the first request starts the one lookup; the others await it
            self._model_lookup = asyncio.ensure_future(self._lookup_model())
        await asyncio.shield(self._model_lookup)

    async def _lookup_model(self) -> None:
        """``GET /models`` (retried like a request); the first model listed becomes ``self.model``."""
        hint = "; pass --teacher-model NAME to skip the lookup"
        try:
            data = await self._retrying(lambda: self._request("GET", "/models"))
        except _Transient as last:
            dead = self._gave_up(last, f" (GET {self.base_url}/models)")
            raise (dead or BackendUnavailable(f"GET {self.base_url}/models: gave up after {self.max_retries + 1} "
                                              f"attempts (last: {last.kind}: {last.detail}){hint}", last.kind)) from None
        except RequestFailed as e:
            raise BackendUnavailable(f"GET {self.base_url}/models: {e}{hint}", e.kind) from None
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")] \
            if isinstance(data.get("data"), list) else []
        if not ids:
            raise BackendUnavailable(f"{self.base_url}/models lists no model{hint}", "no_model")
        self._ever_ok = True
        self.model = str(ids[0])

    async def _once(self, messages: list[dict], params: GenParams) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        data = await self._request("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Transient("malformed", f"response has no choices[0].message.content: {str(data)[:120]}") from None
        if not isinstance(text, str):
            raise _Transient("malformed", "choices[0].message.content is not a string")
        usage = data.get("usage") or {}
        if isinstance(usage, dict):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return text

    def _new_loop(self) -> None:
        self._client = None       # the old loop's connections cannot be used (or closed) from this one
        self._model_lookup = None

    async def end_loop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        self._client = None


# ---------------------------------------------------------------------------------------------
# A dhad model in process, through the continuous-batching engine

class EngineBackend(_Base):
    """A dhad model through `dhad.engine.Engine` (continuous batching, CPU or GPU).

    ``fmt``: a chat format name / `ChatFormat` / model directory; default: the tokenizer's own
    chat_template, else the family format from the model config (as `dhad.generate`).
    """

    name = "engine"

    def __init__(self, model, tokenizer, fmt=None, max_batch_size: int = 8, max_queue: int = 1024,
                 concurrency: int | None = None, max_retries: int = 2, label: str = "dhad model", **engine_kw):
        super().__init__(concurrency or max_batch_size, max_retries, backoff=0.05, max_backoff=1.0)
        from dhad import prompts
        from dhad.engine import Engine
        from dhad.generate import default_format

        self.tokenizer = tokenizer
        self.fmt = prompts.get_format(fmt) if fmt is not None else default_format(model, tokenizer)
        self.label = label
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size,
                             max_queue=max(max_queue, self.concurrency), **engine_kw)
        self.engine.start()

    @classmethod
    def from_dir(cls, model_dir: str, dtype: str = "float32", device: str = "cpu", fmt=None, **kw) -> "EngineBackend":
        import dhad
        model = dhad.load_model(model_dir, dtype=dtype, device=device)
        tok = dhad.load_tokenizer(model_dir)
        # the directory's own format (its chat_template, else its family's), as `dhad serve` picks it
        return cls(model, tok, fmt=fmt if fmt is not None else str(model_dir), label=str(model_dir), **kw)

    def describe(self) -> str:
        return f"engine ({self.label})"

    @property
    def teacher(self) -> str:
        return self.label

    async def _once(self, messages: list[dict], params: GenParams) -> str:
        from dhad import prompts
        from dhad.engine import EngineClosed, QueueFull, RequestError
        from dhad.generate import SamplingParams

        try:
            text = prompts.render(messages, self.fmt, add_generation_prompt=True)
        except prompts.PromptError as e:
            raise RequestFailed(f"cannot render the conversation: {e}", "bad_messages") from None
        ids = self.tokenizer.encode(text)
        stops = tuple(dict.fromkeys(tuple(params.stop) + tuple(self.fmt.stop_strings)))
        # OpenAI semantics, as `dhad serve` maps them: sampling unless temperature is 0, no top-k
        # (so a seeded request samples the same tokens in process and through the server)
        sp = SamplingParams(max_new_tokens=params.max_tokens, do_sample=params.temperature > 0,
                            temperature=params.temperature if params.temperature > 0 else 1.0,
                            top_p=params.top_p, top_k=0, seed=params.seed, stop_strings=stops)
        try:
            h = self.engine.submit(ids, sp)
        except QueueFull as e:
            raise _Transient("http_429", str(e)) from None
        except RequestError as e:
            raise RequestFailed(str(e), "http_4xx") from None
        except EngineClosed as e:
            raise BackendUnavailable(str(e), "closed") from None
        parts, last = [], None
        async for ev in h:
            parts.append(ev.text)
            last = ev
        if last is None or last.finish_reason == "error":
            raise _Transient("http_5xx", f"engine error: {getattr(last, 'error', None)}")
        self.stats.prompt_tokens += last.prompt_tokens
        self.stats.completion_tokens += last.completion_tokens
        return "".join(parts)

    def close(self) -> None:
        self.engine.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------
# Running many requests

async def run_bounded(jobs, worker, max_inflight: int, fatal: list) -> None:
    """Run ``worker(*args)`` for every ``args`` of the iterable ``jobs``, at most ``max_inflight`` at
    once (the iterable is consumed lazily, so a huge input is never read ahead). A worker that
    records an exception in ``fatal`` (e.g. 401 from the server) stops the run with that exception;
    any other failure propagates as itself rather than as an ExceptionGroup."""
    inflight = asyncio.Semaphore(max_inflight)
    try:
        async with asyncio.TaskGroup() as tg:
            for args in jobs:
                await inflight.acquire()
                tg.create_task(worker(*args)).add_done_callback(lambda _t: inflight.release())
    except BaseExceptionGroup as eg:
        if fatal:
            raise fatal[0] from None
        raise eg.exceptions[0] if len(eg.exceptions) == 1 else eg
