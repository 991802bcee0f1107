"""What every generating route does, in order: check the model and the options, bound the prompt,
render and tokenise it off the event loop, submit it to the engine, and turn engine events into text.

    svc = Service(backend, content_filter=None, limits=Limits())
    ids = await svc.chat_ids(messages)            # or: await svc.text_ids(prompt)
    run = Run(svc.submit(ids, params), svc.content_filter)
    text = await run.collect(request)             # or: async for delta in run.deltas(): ...

Every problem is raised as `APIError` (dhad.serve.errors), which the app answers in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from dhad import prompts
from dhad.engine import EngineClosed, QueueFull, RequestError, UnknownAdapter
from dhad.generate import SamplingParams
from dhad.serve import schemas as S
from dhad.serve.backend import Backend
from dhad.serve.errors import APIError, error_body
from dhad.serve.filters import ContentFilter
from dhad.serve.limits import Limits
from dhad.tokenizer import TokenizerError


class Service:
    """The backend plus the server's policy (limits, content filter, shutdown state)."""

    def __init__(self, backend: Backend, content_filter: ContentFilter | None = None, limits: Limits | None = None):
        self.backend = backend
        self.content_filter = content_filter
        self.limits = limits or Limits()
        self.draining = False

    @property
    def max_prompt_chars(self) -> int:
        return self.limits.prompt_chars(self.backend.context)

    # -- checks that need no tokenizer ----------------------------------------------------------
    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for a name not served."""
        try:
            return self.backend.adapter_for(name)
        except KeyError:
            served = ", ".join(repr(n) for n in self.backend.model_names)
            raise APIError(404, f"model {name!r} is not served here (this server serves {served})",
                           "not_found_error", param="model", code="model_not_found") from None

    def _check_chars(self, n_chars: int, param: str) -> None:
        limit = self.max_prompt_chars
        if n_chars > limit:
            raise APIError(400, f"the prompt is {n_chars} characters; this server accepts at most {limit} "
                                f"(its context is {self.backend.context} tokens)", param=param,
                           code="context_length_exceeded")

    def _check_filter(self, texts, param: str) -> None:
        f = self.content_filter
        if f is None:
            return
        for t in texts:
            if f.find(t) is not None:
                raise APIError(400, "the request was blocked by the server's content filter", param=param,
                               code="content_filter")

    # -- prompt -> token ids, off the event loop ------------------------------------------------
    async def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the chat format (400 when it is too long or malformed)."""
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")

        def work():
            self._check_filter([m["content"] for m in messages], "messages")
            try:
                return self.backend.chat_prompt(messages)
            except prompts.PromptError as e:
                raise APIError(400, str(e), param="messages") from None
            except (TokenizerError, UnicodeError) as e:
                raise APIError(400, f"the messages cannot be tokenised: {e}", param="messages",
                               code="invalid_text") from None

        return self._check_context(await asyncio.to_thread(work), "messages")

    async def text_ids(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of a raw prompt (no chat format)."""
        self._check_chars(len(text), param)

        def work():
            self._check_filter([text], param)
            try:
                return self.backend.encode(text, add_special_tokens=True)  # raw text: BOS as the tokenizer says
            except (TokenizerError, UnicodeError) as e:
                raise APIError(400, f"the {param} cannot be tokenised: {e}", param=param, code="invalid_text") from None

        return self._check_context(await asyncio.to_thread(work), param)

    def _check_context(self, ids: list[int], param: str) -> list[int]:
        context = self.backend.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens "
                                f"(at most {context - 1} leave room for an answer)", param=param,
                           code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param=param)
        return ids

    # -- parameters ---------------------------------------------------------------------------
    def params(self, base: SamplingParams, given: dict, chat: bool) -> SamplingParams:
        """``given``: transformers-named overrides of ``base``; the server's limit is checked here so the
        message names the request's own parameter. ``chat`` adds the format's turn-end stop strings."""
        backend = self.backend
        mnt = given.get("max_new_tokens")
        if mnt is not None and mnt > backend.max_new_tokens_limit:
            raise APIError(400, f"max_new_tokens={mnt} is above this server's limit of {backend.max_new_tokens_limit}",
                           param="max_new_tokens", code="max_new_tokens_above_limit")
        try:
            if chat:
                return backend.chat_params(base, **given)
            return SamplingParams.from_kwargs(base, **given)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def openai_params(self, req: S._SamplingFields, default_max: int) -> tuple[SamplingParams, dict]:
        """OpenAI fields -> (base, transformers-named overrides), refusing what is not supported (400)."""
        if req.n is not None and req.n != 1:
            raise APIError(400, f"n={req.n}: this server returns one choice per request (n must be 1)", param="n",
                           code="unsupported_parameter")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty "
                                "(transformers' multiplicative penalty)", param="presence_penalty",
                           code="unsupported_parameter")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        backend = self.backend
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

    # -- the engine ---------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, adapter: str | None = None):
        if self.draining:
            raise APIError(503, "server is shutting down", "server_error", code="shutting_down")
        try:
            if adapter is None:  # the base model: engines without adapters take no adapter argument
                return self.backend.engine.submit(ids, params)
            return self.backend.engine.submit(ids, params, adapter=adapter)
        except UnknownAdapter as e:
            raise APIError(404, str(e), "not_found_error", param="model", code="model_not_found") from None
        except QueueFull as e:
            raise APIError(429, f"server busy, retry later: {e}", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, f"server is shutting down: {e}", "server_error", code="shutting_down") from None
        except RequestError as e:
            raise APIError(400, str(e)) from None


class Run:
    """Consumes one engine request; yields text deltas and records finish reason and usage.

    The content filter (when set) checks the answer as it streams, releasing only text that can no
    longer turn into a blocked term."""

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

    async def collect(self, request) -> str:
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

    def error_event(self) -> bytes:
        return sse(error_body(f"generation failed: {self.error}", "server_error"))

    @property
    def usage(self) -> S.Usage:
        return S.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       total_tokens=self.prompt_tokens + self.completion_tokens)


async def _wait_disconnect(request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
