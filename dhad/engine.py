"""Batched generation engine: continuous batching over a per-row KV cache, streaming, cancellation.

Interface (what `dhad serve` and `dhad chat` code against):

    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=64, max_new_tokens_limit=4096,
                    max_seq_len=None,        # None: the model's context (config.block_size)
                    adapters=None)           # LoRA adapters {name: weights} or a dhad.multi_lora.MultiLoRA
    engine.start()                           # background thread
    h = engine.submit(prompt_ids, params)    # -> RequestHandle; raises QueueFull, RequestError, EngineClosed
    h = engine.submit(ids, params, adapter="ar-chat")   # through a LoRA adapter (UnknownAdapter if not held)
    for ev in h: ...                         # StreamEvent(text, token_ids, finished, finish_reason, usage)
    async for ev in h: ...                   # same, asyncio-friendly (closing early cancels the request)
    async for ev in engine.stream(prompt_ids, params): ...   # submit + async iterate (cancels on close)
    h.cancel(); h.result(timeout) -> Completion(text, token_ids, finish_reason, usage)
    engine.stats() -> dict; engine.shutdown(wait=True)   # wait: finish queued and running requests

    params: a `dhad.generate.SamplingParams` or keyword arguments (transformers' names).
    finish_reason: "stop" (EOS / stop id / stop string), "length", "cancelled", "error".

`QueueFull` means every row is busy and the wait queue holds ``max_queue`` requests (the server
answers 429/503). `RequestError` is the client's fault (prompt longer than the context, empty
prompt, max_new_tokens above the limit, bad parameters): a 400. `engine="vllm"` (see
`dhad.vllm_engine.VLLMEngine`) offers the same interface.

Design choices (nanochat `engine.py` / gpt-fast):
- The engine knows token ids; the tokenizer is used only to turn ids into UTF-8-safe text deltas
  (`StreamDecoder`) and to find stop strings.
- One `KVCache` of ``max_batch_size`` rows lives for the engine's life. Running sequences always
  occupy rows 0..n-1: a decode step runs the model on views of those rows (no copies); requests
  waiting for a row are prefilled straight into rows n.. between decode steps, several in one
  left-padded forward (the model measures ALiBi distances between positions, so padding changes
  nothing -- except under ALiBi `train_seq_len` scaling, whose key length counts slots: there only
  equal-length prompts share a prefill); a finished row is filled by moving the
  last running row into it (`KVCache.copy_row`) so the batch stays dense.
- Per-row sampling parameters and a per-request `torch.Generator` (`Sampler`): a seeded request
  samples the same tokens whether it runs alone or beside others (up to float rounding of a
  batched matmul).
- LoRA adapters (`dhad.multi_lora`): requests of different adapters and of the base model share
  one batch -- prefill and decode -- each row carrying its adapter's index; base rows get no delta.
- Cancellation is cooperative: flags are checked between decode steps, so a cancelled request
  frees its row within one step.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from dhad.engine_api import (Completion, EngineClosed, EngineError, EngineFrontend, QueueFull, RequestError,
                             RequestHandle, StreamEvent, UnknownAdapter)
from dhad.generate import SamplingParams, Sampler, StopMatcher, StreamDecoder, eos_ids_of

__all__ = ["Engine", "RequestHandle", "StreamEvent", "Completion", "EngineError", "QueueFull", "RequestError",
           "UnknownAdapter", "EngineClosed", "make_engine"]


@dataclass
class _Seq:
    handle: RequestHandle
    limit: int                      # max new tokens for this request
    stop_ids: frozenset
    decoder: StreamDecoder | None
    matcher: StopMatcher
    last: int = 0                   # last token (input of the next decode step)
    n_gen: int = 0
    lora: int = -1                  # the row's adapter index in the engine's MultiLoRA (-1: base model)


class Engine(EngineFrontend):
    """Continuous-batching generation over one model (see the module docstring)."""

    def __init__(self, model, tokenizer=None, max_batch_size: int = 8, max_queue: int = 64,
                 max_new_tokens_limit: int = 4096, max_seq_len: int | None = None,
                 default_params: SamplingParams | None = None, max_prefill_tokens: int = 8192,
                 adapters=None):
        if max_batch_size < 1 or max_queue < 0 or max_new_tokens_limit < 1:
            raise ValueError("max_batch_size and max_new_tokens_limit must be >= 1, max_queue >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens one batched prefill may hold
        self.max_seq_len = min(max_seq_len or self.config.block_size, self.config.block_size)
        self.default_params = default_params or SamplingParams()
        if (self.default_params.max_new_tokens or 0) > max_new_tokens_limit:  # a default never exceeds the limit
            self.default_params = dataclasses.replace(self.default_params, max_new_tokens=max_new_tokens_limit)
        self.device = model.device
        # LoRA adapters, batched per row (dhad.multi_lora): a MultiLoRA over this model, or
        # {name: {(layer, target): (A, B, scale)}} to build one
        self.lora = None
        if adapters:
            from dhad.multi_lora import MultiLoRA
            self.lora = adapters if isinstance(adapters, MultiLoRA) else MultiLoRA(model, adapters)
            if self.lora.model is not model:
                raise ValueError("the MultiLoRA was built over another model")
            self.adapter_names = tuple(self.lora.names)
        self._special = set(getattr(tokenizer, "special_ids", ()) or ()) if tokenizer is not None else set()
        self._cv = threading.Condition()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._rows: list[_Seq] = []
        self._thread: threading.Thread | None = None
        self._closing = False     # no new submissions
        self._abort = False       # cancel everything (shutdown(wait=False))
        self._ids = itertools.count()
        self._cache = None
        self._sampler = None
        self._counters = collections.Counter()
        self._started_at = None
        self._admitting = 0       # taken off the queue, being prefilled (still occupy a row)
        self._deferred: list = []  # final events, emitted once their row is free again

    # -- public API ----------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cv:
            if self._thread is not None:
                return self
            if self._closing:
                raise EngineClosed("engine was shut down")
            from dhad.kv_cache import KVCache
            self._cache = KVCache.empty(self.config, self.max_batch_size, self.max_seq_len,
                                        dtype=self.model.dtype, device=self.device)
            self._sampler = Sampler(self.max_batch_size, self.config.vocab_size, self.device)
            self._thread = threading.Thread(target=self._serve, name="dhad-engine", daemon=True)
            self._started_at = time.perf_counter()
            self._thread.start()
        return self

    def submit(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
               adapter: str | None = None, **kwargs) -> RequestHandle:
        """Queue a request (thread-safe). ``prompt_ids``: token ids (a str is encoded with the tokenizer).
        ``adapter``: the name of a LoRA adapter the engine holds (None: the base model)."""
        adapter = self._check_adapter(adapter)
        prompt_ids, params = self._prepare(prompt_ids, params, kwargs)
        rid = request_id or f"req-{next(self._ids)}"
        h = RequestHandle(rid, prompt_ids, params, self, adapter)
        with self._cv:
            if self._closing:
                raise self._closed_error()
            if self._thread is None:
                raise EngineClosed("engine not started (call start())")
            free = self.max_batch_size - len(self._rows) - self._admitting
            if len(self._pending) >= self.max_queue + max(free, 0):
                self._counters["rejected"] += 1
                raise QueueFull(f"engine busy: {len(self._rows)} running, {len(self._pending)} queued "
                                f"(max_batch_size={self.max_batch_size}, max_queue={self.max_queue})")
            self._pending.append(h)
            self._counters["submitted"] += 1
            self._cv.notify()
        return h

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests and join the worker thread; with ``wait`` finish queued and running
        requests first, else cancel them (within one decode step). EngineError if the thread is still
        running after ``timeout`` seconds."""
        with self._cv:
            self._closing = True
            if not wait:
                self._abort = True
            self._cv.notify_all()
        self._join(timeout)

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": self.running, "closing": self._closing, "error": self.error,
                "active": len(self._rows), "queued": len(self._pending),
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                "max_new_tokens_limit": self.max_new_tokens_limit, "max_seq_len": self.max_seq_len,
                "adapters": list(self.adapter_names),
                "submitted": self._counters["submitted"], "completed": self._counters["completed"],
                "cancelled": self._counters["cancelled"], "rejected": self._counters["rejected"],
                "errors": self._counters["errors"], "generated_tokens": self._counters["tokens"],
                "decode_steps": self._counters["steps"], "prefill_tokens": self._counters["prefill_tokens"],
                "uptime_s": 0.0 if self._started_at is None else time.perf_counter() - self._started_at,
            }

    # -- validation ----------------------------------------------------------------------------
    # -- the loop ------------------------------------------------------------------------------
    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _loop(self):
        """The worker thread (run by `EngineFrontend._serve`, which handles a failure)."""
        while True:
            with self._cv:
                while not self._pending and not self._rows and not self._closing and not self._any_cancelled():
                    self._cv.wait()
                if self._abort:
                    pending, self._pending = list(self._pending), collections.deque()
                else:
                    pending = []
                if self._closing and not self._pending and not self._rows and not pending:
                    return
            for h in pending:
                self._finish_unstarted(h, "cancelled")
            if self._abort:
                for r in range(len(self._rows) - 1, -1, -1):
                    self._rows[r].handle.cancelled = True
            self._admit()
            if self._rows:
                self._step()

    def _any_cancelled(self) -> bool:
        return any(s.handle.cancelled for s in self._rows) or any(h.cancelled for h in self._pending)

    def _admit(self):
        """Move queued requests into free rows, prefilling them (batched when possible) between steps."""
        with self._cv:
            gone = [h for h in self._pending if h.cancelled]
            if gone:
                self._pending = collections.deque(h for h in self._pending if not h.cancelled)
            take = []
            while self._pending and len(self._rows) + len(take) < self.max_batch_size:
                take.append(self._pending.popleft())
            self._admitting = len(take)
        for h in gone:  # cancelled while waiting: answer now, even when every row is busy
            self._finish_unstarted(h, "cancelled")
        for group in self._group(take):
            try:
                self._prefill(group)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the engine
                self._counters["errors"] += len(group)
                for h in group:
                    if not h.done:
                        self._finish_unstarted(h, "error", f"{type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._admitting = max(0, self._admitting - len(group))
        with self._cv:
            self._admitting = 0

    def _group(self, handles: list[RequestHandle]) -> list[list[RequestHandle]]:
        """Requests that can share one left-padded prefill.

        Padding takes cache slots, so a request joins a group only if the group's padded length
        still leaves room for its whole answer. ALiBi distances are measured between positions, so
        left padding changes nothing, except that `alibi_scaling.train_seq_len` divides the slopes by
        the key length in slots: under it only equal lengths share a prefill.
        """
        slot_sensitive = bool((self.config.alibi_scaling or {}).get("train_seq_len")) and self.config.position == "alibi"
        groups: list[list[RequestHandle]] = []
        for h in handles:
            n = len(h.prompt_ids)
            for g in groups:
                T = max(n, max(len(x.prompt_ids) for x in g))
                if slot_sensitive and n != len(g[0].prompt_ids):
                    continue
                if T * (len(g) + 1) > self.max_prefill_tokens:
                    continue
                if all(T + self._limit(len(x.prompt_ids), x.params) <= self.max_seq_len for x in g + [h]):
                    g.append(h)
                    break
            else:
                groups.append([h])
        return groups

    @torch.inference_mode()
    def _prefill(self, group: list[RequestHandle]):
        """Prefill a group of prompts (left-padded) straight into rows r0.. and take their first token."""
        seqs = []
        for h in group:
            params = h.params
            stop_ids = frozenset(eos_ids_of(params, self.config, self.tokenizer)) | frozenset(params.stop_token_ids)
            seq = _Seq(h, self._limit(len(h.prompt_ids), params), stop_ids,
                       StreamDecoder(self.tokenizer, skip_ids=self._special) if self.tokenizer is not None else None,
                       StopMatcher(params.stop_strings))
            if self.lora is not None and h.adapter is not None:
                seq.lora = self.lora.index[h.adapter]
            if seq.limit == 0:
                self._finish_unstarted(h, "length")
            else:
                seqs.append(seq)
        if not seqs:
            return
        r0, m = len(self._rows), len(seqs)
        T = max(len(s.handle.prompt_ids) for s in seqs)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (T - len(s.handle.prompt_ids)) + s.handle.prompt_ids for s in seqs],
                           dtype=torch.long, device=self.device)
        mask = None
        if any(len(s.handle.prompt_ids) != T for s in seqs):
            mask = torch.tensor([[0] * (T - len(s.handle.prompt_ids)) + [1] * len(s.handle.prompt_ids) for s in seqs],
                                dtype=torch.long, device=self.device)
        self._cache.reset_rows(list(range(r0, r0 + m)))
        for i, s in enumerate(seqs):
            self._sampler.set_row(r0 + i, s.handle.params, s.handle.prompt_ids, s.stop_ids)
        with self._adapters(seqs):
            logits = self.model(ids, attention_mask=mask, cache=self._cache.rows(r0, r0 + m), keep=1)[:, -1]
        self._counters["prefill_tokens"] += sum(len(s.handle.prompt_ids) for s in seqs)
        rows = torch.arange(r0, r0 + m, device=self.device)
        toks = self._sampler(logits, rows)
        self._sampler.observe(toks, rows)
        self._rows.extend(seqs)
        done = [r0 + i for i, t in enumerate(toks.tolist()) if self._advance(r0 + i, t)]
        if done:
            self._release(done)

    @torch.inference_mode()
    def _step(self):
        """One decode step for every running row, then drop finished and cancelled rows."""
        cancelled = [r for r, s in enumerate(self._rows) if s.handle.cancelled]
        for r in cancelled:
            self._finish(self._rows[r], "cancelled")
        if cancelled:
            self._release(cancelled)
        n = len(self._rows)
        if n == 0:
            return
        ids = torch.tensor([[s.last] for s in self._rows], dtype=torch.long, device=self.device)
        try:
            with self._adapters(self._rows):
                logits = self.model(ids, cache=self._cache.rows(0, n), keep=1)[:, -1]
        except Exception as e:  # noqa: BLE001
            self._counters["errors"] += n
            for s in self._rows:
                self._finish(s, "error", f"{type(e).__name__}: {e}")
            self._release(list(range(n)))
            return
        self._counters["steps"] += 1
        toks = self._sampler(logits)
        self._sampler.observe(toks)
        done = [r for r, t in enumerate(toks.tolist()) if self._advance(r, t)]
        if done:
            self._release(done)

    def _adapters(self, seqs: list[_Seq]):
        """The forward's per-row adapter indices (a no-op without adapters)."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.batch([s.lora for s in seqs])

    def _advance(self, r: int, tok: int) -> bool:
        """Record token ``tok`` for row r, emit its event; True when the request is finished."""
        s = self._rows[r]
        s.last, s.n_gen = tok, s.n_gen + 1
        self._counters["tokens"] += 1
        reason = None
        text = ""
        if tok in s.stop_ids:
            reason = "stop"
        elif s.decoder is not None:
            text = s.matcher.feed(s.decoder.push(tok))
            if s.matcher.stopped:
                reason = "stop"
        if reason is None and s.n_gen >= s.limit:
            reason = "length"
        if reason is not None and s.decoder is not None and not s.matcher.stopped:
            text += s.matcher.feed(s.decoder.flush()) + s.matcher.flush()
        ev = StreamEvent(s.handle.id, text, [tok], reason is not None, reason, len(s.handle.prompt_ids), s.n_gen)
        if reason is not None:
            # the final event goes out after _release has freed the row, so a client that resubmits
            # at once finds the row free
            self._deferred.append((s.handle, ev))
            self._counters["completed"] += 1
        else:
            s.handle._emit(ev)
        return reason is not None

    def _finish(self, s: _Seq, reason: str, error: str | None = None):
        text = ""
        if reason != "cancelled" and s.decoder is not None and not s.matcher.stopped:
            text = s.matcher.feed(s.decoder.flush()) + s.matcher.flush()
        self._counters["cancelled" if reason == "cancelled" else "completed"] += 1
        s.handle._emit(StreamEvent(s.handle.id, text, [], True, reason, len(s.handle.prompt_ids), s.n_gen, error))

    def _finish_unstarted(self, h: RequestHandle, reason: str, error: str | None = None):
        self._counters["cancelled" if reason == "cancelled" else "completed"] += 1
        h._emit(StreamEvent(h.id, "", [], True, reason, len(h.prompt_ids), 0, error))

    def _release(self, rows: list[int]):
        """Free finished rows, keeping running rows dense in 0..n-1 (move the last row into a hole),
        then emit the final events of the requests that finished."""
        for r in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if r != last:
                self._cache.copy_row(self._cache, last, r)
                self._sampler.move_row(last, r)
                self._rows[r] = self._rows[last]
            self._rows.pop()
            self._cache.reset_rows([last])
        deferred, self._deferred = self._deferred, []
        for handle, ev in deferred:
            handle._emit(ev)

    def _fail_all(self, message: str):
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
        for s in list(self._rows):
            if not s.handle.done:
                self._finish(s, "error", message)
        self._rows.clear()
        for h in pending:
            self._finish_unstarted(h, "error", message)


def make_engine(model_or_dir, tokenizer=None, engine: str = "native", **kwargs):
    """`--engine native|vllm`: the native Engine over a dhad model, or vLLM over a model directory."""
    if engine == "native":
        return Engine(model_or_dir, tokenizer, **kwargs)
    if engine == "vllm":
        from dhad.vllm_engine import VLLMEngine
        return VLLMEngine(model_or_dir, tokenizer, **kwargs)
    raise ValueError(f"unknown engine {engine!r}: expected 'native' or 'vllm'")
