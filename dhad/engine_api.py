"""The engine interface: what `dhad.engine.Engine` (native) and `dhad.vllm_engine.VLLMEngine` share.

Requests (`RequestHandle`), their events (`StreamEvent`) and results (`Completion`), the errors a
caller handles (`QueueFull` -> 429, `RequestError` -> 400, `EngineClosed` -> 503), and
`EngineFrontend`: request validation and the calls built on an engine's ``start`` / ``submit`` /
``shutdown``. Both engines import this module; neither imports the other (`dhad.engine.make_engine`
loads the vLLM adapter lazily), so the two form no import cycle.

An engine's worker thread ends when the engine is shut down or fails; `EngineFrontend._serve`
wraps the loop so that a failure ends every waiting request with an error, is logged, closes the
engine (new requests get `EngineClosed` naming it) and never escapes the thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from dhad.generate import SamplingParams

__all__ = ["RequestHandle", "StreamEvent", "Completion", "EngineError", "QueueFull", "RequestError",
           "UnknownAdapter", "EngineClosed", "EngineFrontend"]

log = logging.getLogger("dhad.engine")


class EngineError(RuntimeError):
    """Base class of engine errors."""


class QueueFull(EngineError):
    """All rows busy and the wait queue is full: retry later (HTTP 429 / 503)."""


class RequestError(EngineError, ValueError):
    """The request cannot be served as asked (HTTP 400): the message names the problem."""


class UnknownAdapter(RequestError):
    """The request names a LoRA adapter this engine does not hold (HTTP 404 ``model_not_found``)."""


class EngineClosed(EngineError):
    """The engine is shutting down or stopped and takes no new requests (HTTP 503)."""


@dataclass
class StreamEvent:
    request_id: str
    text: str = ""                 # new text since the previous event (complete UTF-8)
    token_ids: list[int] = field(default_factory=list)  # new token ids
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0     # so far
    error: str | None = None

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    ttft_s: float | None = None    # time from submit to the first token
    latency_s: float | None = None

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class RequestHandle:
    """One request's results. Iterate (sync or async) for StreamEvents; every iterator sees all
    events from the start. `cancel()` is safe from any thread."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, engine: "EngineFrontend",
                 adapter: str | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter          # LoRA adapter name, None = the base model
        self._engine = engine
        self._lock = threading.Lock()
        self._history: list[StreamEvent] = []
        self._sinks: list = []
        self._done = threading.Event()
        self.cancelled = False
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request; it finishes with finish_reason "cancelled"."""
        if not self.done:
            self.cancelled = True
            self._engine._wake()

    # called by the engine thread only
    def _emit(self, ev: StreamEvent) -> None:
        with self._lock:
            self.text += ev.text
            self.token_ids.extend(ev.token_ids)
            if ev.token_ids and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if ev.finished:
                self.finish_reason, self.error = ev.finish_reason, ev.error
                self.finished_at = time.perf_counter()
            self._history.append(ev)
            sinks = list(self._sinks)
        for kind, target in sinks:
            if kind == "sync":
                target.put(ev)
            else:
                loop, q = target
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:  # the consumer's event loop is closed
                    pass
        if ev.finished:
            self._done.set()

    def __iter__(self):
        q: queue.Queue = queue.Queue()
        with self._lock:
            for ev in self._history:
                q.put(ev)
            self._sinks.append(("sync", q))
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finished:
                    return
        finally:
            with self._lock:
                self._sinks = [s for s in self._sinks if s[1] is not q]

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for ev in self._history:
                q.put_nowait(ev)
            sink = ("async", (loop, q))
            self._sinks.append(sink)
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finished:
                    return
        finally:
            with self._lock:
                self._sinks = [s for s in self._sinks if s is not sink]
            if not self.done:  # the consumer went away (client disconnected): free the row
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and return the whole answer (TimeoutError if not done in time)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        return Completion(self.id, self.text, list(self.token_ids), self.finish_reason, len(self.prompt_ids),
                          len(self.token_ids), self.error,
                          ttft_s=None if self.first_token_at is None else self.first_token_at - self.submitted_at,
                          latency_s=self.finished_at - self.submitted_at)


class EngineFrontend:
    """What the native and the vLLM engine share: request validation, the worker thread's life, and
    the calls built on their ``start`` / ``submit`` / ``shutdown``. Needs the attributes
    ``default_params``, ``tokenizer``, ``vocab_size``, ``max_seq_len``, ``max_new_tokens_limit``,
    ``_cv`` (a Condition), ``_closing``, ``_thread`` and the methods ``_loop`` and ``_fail_all``."""

    error: str | None = None  # why the engine stopped, when it failed
    adapter_names: tuple[str, ...] = ()  # LoRA adapters a request may name (``submit(..., adapter=NAME)``)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        """The worker thread's body: `_loop` until shutdown. A failure ends every request still waiting
        with finish_reason "error", is logged, and closes the engine; it never escapes the thread
        (an exception left to `threading.excepthook` surfaced long after its cause, in whatever ran next)."""
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine's owner learns it from .error / EngineClosed
            with self._cv:  # closed first: nothing submitted from now on can be left waiting
                self.error = f"{type(e).__name__}: {e}"
                self._closing = True
            log.error("dhad engine stopped: %s", self.error, exc_info=e)
            self._fail_all(f"engine stopped: {self.error}")
        finally:
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._after_loop()

    def _after_loop(self) -> None:
        """Hook for releasing what the loop used (the vLLM adapter stops vLLM's processes)."""

    def _closed_error(self) -> EngineClosed:
        if self.error:
            return EngineClosed(f"engine stopped after an error ({self.error}); not accepting requests")
        return EngineClosed("engine is shutting down; not accepting requests")

    def _join(self, timeout: float | None) -> None:
        """Wait for the worker thread to end (not from the thread itself); EngineError if it outlives ``timeout``."""
        t = self._thread
        if t is None or t is threading.current_thread():
            return
        t.join(timeout)
        if t.is_alive():
            raise EngineError(f"the engine thread did not stop within {timeout:g} s")

    async def stream(self, prompt_ids, params: SamplingParams | None = None, **kwargs):
        """Submit and yield StreamEvents; closing the iterator early cancels the request."""
        h = self.submit(prompt_ids, params, **kwargs)
        async for ev in h:
            yield ev

    def generate(self, prompt_ids, params: SamplingParams | None = None, timeout: float | None = None,
                 **kwargs) -> Completion:
        """Blocking convenience: submit and wait for the result."""
        return self.submit(prompt_ids, params, **kwargs).result(timeout)

    def _prepare(self, prompt_ids, params: SamplingParams | None, kwargs: dict) -> tuple[list[int], SamplingParams]:
        """Token ids and parameters of a request, or RequestError naming what is wrong with it."""
        try:
            params = SamplingParams.from_kwargs(params or self.default_params, **kwargs) if kwargs else \
                (params or self.default_params)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if isinstance(prompt_ids, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs an engine with a tokenizer; pass token ids")
            prompt_ids = self.tokenizer.encode(prompt_ids, add_special_tokens=True)  # raw text: BOS as the tokenizer says
        if torch.is_tensor(prompt_ids):
            prompt_ids = prompt_ids.flatten().tolist()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise RequestError("empty prompt: at least one token is needed")
        V = self.vocab_size
        bad = next((i for i in prompt_ids if not 0 <= i < V), None) if V else None
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary (0..{V - 1})")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens is longer than the context: at most "
                               f"{self.max_seq_len - 1} tokens leave room for an answer")
        if params.max_new_tokens is not None and params.max_new_tokens > self.max_new_tokens_limit:
            raise RequestError(f"max_new_tokens={params.max_new_tokens} is above this server's limit "
                               f"of {self.max_new_tokens_limit}")
        if params.stop_strings and self.tokenizer is None:
            raise RequestError("stop strings need an engine with a tokenizer")
        return prompt_ids, params

    def _check_adapter(self, adapter: str | None) -> str | None:
        """``adapter`` when this engine holds it (None: the base model), else UnknownAdapter."""
        if adapter is not None and adapter not in self.adapter_names:
            held = ", ".join(map(repr, self.adapter_names)) or "none"
            raise UnknownAdapter(f"unknown adapter {adapter!r} (this engine holds: {held})")
        return adapter

    def _limit(self, n_prompt: int, params: SamplingParams) -> int:
        """New tokens a request may have: its own limits, the server's and the context's."""
        limit = min(self.max_seq_len - n_prompt, self.max_new_tokens_limit)
        if params.max_new_tokens is not None:
            limit = min(limit, params.max_new_tokens)
        if params.max_length is not None:
            limit = min(limit, params.max_length - n_prompt)
        return max(limit, 0)


