"""Sampling and decoding with the KV cache (what `dhad.generate` and the engine run).

    params = SamplingParams(max_new_tokens=64, do_sample=True, temperature=0.3, top_p=0.9, seed=0)
    params = SamplingParams.preset("jais")                      # the Jais card's settings
    new_ids = generate_ids(model, input_ids, params)            # list[list[int]] per row
    text = generate_text(model, tok, "prompt" or messages, fmt=None, max_new_tokens=64, ...)

Design choices:
- Parameter names and meanings are transformers' (`GenerationConfig`), defaults included
  (top_k 50, temperature 1.0, top_p 1.0, greedy unless ``do_sample``), so the cards' snippets mean
  the same thing here. Extras the server needs follow vLLM: ``stop_strings`` (the matched text is
  not returned), ``stop_token_ids``, per-request ``seed``.
- Logits processing applies transformers' processors in transformers' order, on float32 logits:
  repetition penalty -> min_length / min_new_tokens EOS suppression -> (sampling only) temperature
  -> top-k -> top-p -> softmax -> multinomial. The arithmetic is the same, so the same logits give
  the same distribution; tests check this against transformers' own processor classes.
- One `Sampler` holds per-row parameters as tensors, so a batch whose rows have different
  parameters (the engine) is processed in a few vectorised ops; each row may own a
  `torch.Generator`, which makes a seeded request reproducible whatever else is in the batch.
- Decoding is gpt-fast style: one prefill of the (left-padded) prompt into a `KVCache`, then one
  token per step; the model is never re-run over the prompt. With ``compile=True`` the decode step
  runs the model's static-shape path (whole cache attended, masked) through `torch.compile`, so one
  graph serves every step; on CPU inductor's C++ wrapper removes the Python dispatch per op, which
  is most of a small model's step time at batch 1 (benchmarks/bench_decode.py).
- `StreamDecoder` turns token ids into text deltas that are always complete UTF-8: byte-level BPE
  splits an Arabic letter (2 bytes) across tokens, and a delta is held back while the decoded text
  ends in U+FFFD. `StopMatcher` holds back text that may be the start of a stop string.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

__all__ = ["SamplingParams", "SAMPLING_PRESETS", "Sampler", "StreamDecoder", "StopMatcher", "generate_ids", "generate_text", "decode_step",
           "apply_repetition_penalty", "apply_top_k", "apply_top_p", "eos_ids_of"]


# ---------------------------------------------------------------------------------------------
# Parameters

@dataclass
class SamplingParams:
    """Generation parameters with transformers' names, semantics and defaults.

    Lengths: generation stops after ``max_new_tokens`` new tokens, or when prompt + new tokens
    reach ``max_length`` (total, as transformers), or the model's context, whichever is first.
    ``min_new_tokens`` / ``min_length`` (total, prompt included) forbid EOS (and stop_token_ids)
    until reached: the Jais card's ``min_length = input_len + 4`` is ``min_new_tokens=4``.
    """
    max_new_tokens: int | None = 256
    max_length: int | None = None
    min_new_tokens: int = 0
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None  # None: the model config's
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = tuple(self.eos_token_id)
        self.validate()

    def validate(self) -> "SamplingParams":
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {v!r}")
        if self.max_new_tokens is None and self.max_length is None:
            raise ValueError("set max_new_tokens or max_length (both are None)")
        for name in ("min_new_tokens", "min_length", "top_k"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if not is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}")
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature must be > 0 when do_sample is true (for greedy decoding set do_sample=false)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_num(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if not all(is_int(i) and i >= 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        eos = self.eos_token_id
        if eos is not None and not (is_int(eos) or (isinstance(eos, tuple) and all(is_int(i) for i in eos))):
            raise ValueError(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        return self

    # Accepted spellings besides the field names (vLLM / OpenAI): stop -> stop_strings, min_tokens.
    ALIASES = {"stop": "stop_strings", "min_tokens": "min_new_tokens", "max_tokens": "max_new_tokens"}

    @classmethod
    def from_kwargs(cls, base: "SamplingParams | None" = None, **kw) -> "SamplingParams":
        """Parameters from keyword arguments; unknown names raise ValueError listing the known ones."""
        names = {f.name for f in fields(cls)}
        out = {}
        for k, v in kw.items():
            k = cls.ALIASES.get(k, k)
            if k not in names:
                raise ValueError(f"unknown generation parameter {k!r} (known: {', '.join(sorted(names))})")
            out[k] = v
        return dataclasses.replace(base, **out) if base is not None else cls(**out)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplingParams":
        if name not in SAMPLING_PRESETS:
            raise ValueError(f"unknown sampling preset {name!r} (known: {', '.join(SAMPLING_PRESETS)})")
        return cls.from_kwargs(SAMPLING_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SAMPLING_PRESETS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(),
    # Jais-family README: top_p=0.9, temperature=0.3, repetition_penalty=1.2, do_sample=True,
    # min_length=input_len + 4, max_length=2048.
    "jais": SamplingParams(do_sample=True, top_p=0.9, temperature=0.3, repetition_penalty=1.2, min_new_tokens=4,
                           max_new_tokens=None, max_length=2048),
    # ALLaM card endpoint example: temperature 0.6, top_p 0.9, do_sample true, max_new_tokens 200.
    "allam": SamplingParams(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=200),
}


def eos_ids_of(params: SamplingParams, model_config=None, tokenizer=None) -> tuple[int, ...]:
    """EOS ids that end generation: params.eos_token_id, else the model config's, else the tokenizer's."""
    eos = params.eos_token_id
    if eos is None and model_config is not None:
        eos = getattr(model_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


# ---------------------------------------------------------------------------------------------
# Logits processors (transformers' arithmetic, per-row parameters)

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for tokens already in the sequence (prompt
    included), negative scores are multiplied by the penalty, positive ones divided.
    ``seen`` [B, V] bool; ``penalty`` a float or [B] tensor."""
    if not torch.is_tensor(penalty):
        penalty = torch.tensor(float(penalty), device=logits.device)
    p = penalty.reshape(-1, 1) if penalty.dim() else penalty
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, top_k) -> torch.Tensor:
    """transformers' TopKLogitsWarper; ``top_k`` int or [B] tensor (0 = off for that row)."""
    V = logits.shape[-1]
    k = torch.as_tensor(top_k, device=logits.device).reshape(-1).expand(logits.shape[0]).clone()
    k[(k <= 0) | (k > V)] = V
    kmax = int(k.max())
    if kmax >= V and bool((k == V).all()):
        return logits
    vals = torch.topk(logits, kmax, dim=-1).values
    thresh = vals.gather(1, (k - 1).clamp(max=kmax - 1)[:, None])
    return logits.masked_fill(logits < thresh, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p) -> torch.Tensor:
    """transformers' TopPLogitsWarper (keeps the smallest set whose probability reaches top_p);
    ``top_p`` float or [B] tensor (1.0 = off)."""
    p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    if bool((p >= 1).all()):
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum <= (1 - p)) & (p < 1)
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    remove = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(remove, -float("inf"))


_F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: the floor of temperature and penalty
_F32_MAX = torch.finfo(torch.float32).max


class Sampler:
    """Per-row sampling state of a batch of up to ``batch_size`` sequences.

    Parameters are sanitised so probabilities stay finite for every value `SamplingParams` accepts
    (finite, positive temperature and penalty): values below float32's smallest normal number are
    raised to it, a penalty that overflows a logit is clamped to float32's largest, and a
    temperature that overflows one is applied after shifting the row (see `warp`). Values that do
    not overflow are processed exactly as transformers does.

    Rows are set with `set_row` (parameters, prompt, EOS ids, generator), fed every chosen token
    with `observe`, and `__call__(logits)` picks the next token of rows 0..n-1.
    """

    def __init__(self, batch_size: int, vocab_size: int, device="cpu"):
        B, V = batch_size, vocab_size
        self.V = V
        self.device = torch.device(device)
        z = dict(device=self.device)
        self.seen = torch.zeros(B, V, dtype=torch.bool, **z)  # tokens in prompt + output (repetition penalty)
        self.stop_mask = torch.zeros(B, V, dtype=torch.bool, **z)  # EOS + stop ids (min-length suppression)
        self.penalty = torch.ones(B, **z)
        self.temperature = torch.ones(B, **z)
        self.top_k = torch.zeros(B, dtype=torch.long, **z)
        self.top_p = torch.ones(B, **z)
        self.min_new = torch.zeros(B, dtype=torch.long, **z)
        self.min_total = torch.zeros(B, dtype=torch.long, **z)
        self.prompt_len = torch.zeros(B, dtype=torch.long, **z)
        self.n_gen = torch.zeros(B, dtype=torch.long, **z)
        self.generators: list[torch.Generator | None] = [None] * B
        # Host-side copies of which rows need which processor, so a step decides what to run
        # without reading tensors back (each read is a sync and a few microseconds per token).
        self._pen = [False] * B  # repetition_penalty != 1
        self._samp = [False] * B  # do_sample
        self._minlen = [False] * B  # min_new_tokens / min_length can block EOS
        self._tensors = ("seen", "stop_mask", "penalty", "temperature", "top_k", "top_p", "min_new",
                         "min_total", "prompt_len", "n_gen")

    def set_row(self, r: int, params: SamplingParams, prompt_ids, stop_ids, generator: torch.Generator | None = None):
        self.seen[r] = False
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        if ids.numel():
            self.seen[r, ids.clamp(max=self.V - 1)] = True
        self.stop_mask[r] = False
        stop = [i for i in stop_ids if 0 <= i < self.V]
        if stop:
            self.stop_mask[r, torch.tensor(stop, device=self.device)] = True
        # Floors: a value that rounds to 0 in float32 (5e-324, 1e-300) would divide by zero.
        self.penalty[r] = max(float(params.repetition_penalty), _F32_TINY)
        self.temperature[r] = max(float(params.temperature), _F32_TINY) if params.do_sample else 1.0
        self.top_k[r] = int(params.top_k)
        self.top_p[r] = float(params.top_p)
        self.min_new[r] = int(params.min_new_tokens)
        self.min_total[r] = int(params.min_length)
        self.prompt_len[r] = len(prompt_ids)
        self.n_gen[r] = 0
        self._pen[r] = float(params.repetition_penalty) != 1.0
        self._samp[r] = bool(params.do_sample)
        self._minlen[r] = int(params.min_new_tokens) > 0 or int(params.min_length) > len(prompt_ids)
        if params.do_sample and generator is None:
            generator = torch.Generator(device=self.device)
            # Unseeded: draw the seed from torch's global RNG, so torch.manual_seed makes runs repeatable.
            generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.generators[r] = generator

    def move_row(self, src: int, dst: int):
        for name in self._tensors:
            t = getattr(self, name)
            t[dst] = t[src]
        self.generators[dst] = self.generators[src]
        self.generators[src] = None
        for flags in (self._pen, self._samp, self._minlen):
            flags[dst] = flags[src]

    def _sel(self, t: torch.Tensor, rows, n: int) -> torch.Tensor:
        return t[:n] if rows is None else t[rows]

    @staticmethod
    def _row_list(rows, n: int) -> list[int]:
        return list(range(n)) if rows is None else [int(r) for r in (rows.tolist() if torch.is_tensor(rows) else rows)]

    def observe(self, tokens: torch.Tensor, rows: torch.Tensor | None = None):
        """Record the tokens just chosen for ``rows`` (default rows 0..len(tokens)-1)."""
        n = tokens.shape[0]
        idx = self._row_list(rows, n)
        if any(self._pen[i] for i in idx):  # only the repetition penalty reads `seen`
            r = torch.as_tensor(idx, dtype=torch.long, device=self.device)
            self.seen[r, tokens.clamp(max=self.V - 1)] = True
        if any(self._minlen[i] for i in idx):  # only the min-length check reads `n_gen`
            if rows is None:
                self.n_gen[:n] += 1
            else:
                self.n_gen[torch.as_tensor(idx, dtype=torch.long, device=self.device)] += 1

    def process(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Processors that apply to every row (greedy too): repetition penalty, min-length."""
        n = logits.shape[0]
        idx = self._row_list(rows, n)
        logits = logits.float()
        if any(self._pen[i] for i in idx):  # rows with penalty 1 are left unchanged by it
            logits = apply_repetition_penalty(logits, self._sel(self.seen, rows, n), self._sel(self.penalty, rows, n))
            # a tiny penalty (1e-40) divides a positive logit past float32's range: keep it finite
            logits = logits.clamp(max=_F32_MAX)
        if any(self._minlen[i] for i in idx):
            n_gen = self._sel(self.n_gen, rows, n)
            block = (n_gen < self._sel(self.min_new, rows, n)) | \
                (self._sel(self.prompt_len, rows, n) + n_gen < self._sel(self.min_total, rows, n))
            logits = logits.masked_fill(block[:, None] & self._sel(self.stop_mask, rows, n), -float("inf"))
        return logits

    def warp(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Sampling-only warpers for ``rows``: temperature, top-k, top-p."""
        t = self.temperature[rows]
        if bool((t != 1).any()):
            scaled = logits / t[:, None]
            if bool(torch.isposinf(scaled).any()):
                # A temperature so small that the division overflows (1e-40) would give softmax inf - inf = nan.
                # Softmax ignores a shift, so those rows are divided after subtracting their maximum: the best
                # token stays at 0 and the others go to -inf -- greedy, the limit of temperature -> 0.
                over = torch.isposinf(scaled).any(dim=-1, keepdim=True)
                shifted = (logits - logits.amax(dim=-1, keepdim=True)) / t[:, None]
                scaled = torch.where(over, shifted, scaled)
            logits = scaled
        logits = apply_top_k(logits, self.top_k[rows])
        return apply_top_p(logits, self.top_p[rows])

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Next token for ``rows`` (default 0..n-1) given their last-position logits [n, V]."""
        n = logits.shape[0]
        idx = self._row_list(rows, n)
        logits = self.process(logits, rows)
        out = logits.argmax(dim=-1)
        local = [i for i, r in enumerate(idx) if self._samp[r]]
        if local:
            rows_s = [idx[i] for i in local]
            probs = self.warp(logits[local], torch.as_tensor(rows_s, device=self.device)).softmax(dim=-1)
            for j, (i, r) in enumerate(zip(local, rows_s)):
                out[i] = torch.multinomial(probs[j], 1, generator=self.generators[r])[0]
        return out


# ---------------------------------------------------------------------------------------------
# Text streaming

class StreamDecoder:
    """Incremental detokenizer: feed token ids, get text deltas that are complete UTF-8.

    Decodes a short window of recent ids (TGI / vLLM's prefix-offset method) so that tokenizers
    that drop a leading space at the start of a decode (SentencePiece) still get spaces right, and
    holds text back while the window decodes to a trailing U+FFFD (an unfinished multi-byte
    character: byte-level BPE splits an Arabic letter across two tokens).
    """

    def __init__(self, tokenizer, skip_ids=()):
        self.tok = tokenizer
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything emitted so far

    def _decode(self, ids):
        return self.tok.decode(ids)

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that may be a stop string's start."""

    def __init__(self, stop_strings=()):
        self.stops = tuple(s for s in stop_strings if s)
        self.buf = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text safe to emit now; sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        self.buf += delta
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buf = self.buf[:min(hits)], ""
            return out
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


# ---------------------------------------------------------------------------------------------
# Decoding

def _as_batch(input_ids, attention_mask, pad_id: int):
    """Accept list[int], list[list[int]] (left-padded here) or a LongTensor [B, T]."""
    if torch.is_tensor(input_ids):
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        return ids.long(), (mask if mask.dim() == 2 else mask[None]).long()
    rows = [list(input_ids)] if input_ids and isinstance(input_ids[0], int) else [list(r) for r in input_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("input_ids: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


_COMPILE_BUCKET = 256  # compiled decode: cache lengths rounded up to this, so prompts of similar length share a graph


def decode_step(model, compile: bool = False):
    """The function one decode step runs: ``(tokens [B, 1], cache) -> last-position logits [B, V]``.

    ``compile=False``: the model's eager path; with a dynamic cache, attention reads only its filled part.
    ``compile=True``: compiled once per model with ``fullgraph`` and ``dynamic=False``, for a static
    cache (``KVCache(static=True)``: no host syncs, shapes fixed by the cache) -- one graph per (batch,
    cache length), which is why `generate_ids` rounds cache lengths up to a bucket. If compilation fails
    (no C++ compiler, an unsupported backend), a warning is printed and the eager path is used.
    """
    def eager(tokens, cache):
        return model(tokens, cache=cache, keep=1)[:, -1]

    if not compile:
        return eager
    fn = model.__dict__.get("_dhad_compiled_decode")
    if fn is None:
        # C++ wrapper on CPU: the generated code calls kernels without going back through Python.
        options = {"cpp_wrapper": True} if model.device.type == "cpu" else None
        compiled = torch.compile(eager, fullgraph=True, dynamic=False, options=options)
        state = {"fn": compiled}

        def fn(tokens, cache):
            try:
                return state["fn"](tokens, cache)
            except Exception as e:  # noqa: BLE001 - compiler missing or backend unsupported: stay correct
                if state["fn"] is eager:
                    raise
                import warnings
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {str(e)[:200]}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
                state["fn"] = eager
                return eager(tokens, cache)
        model.__dict__["_dhad_compiled_decode"] = fn
    return fn


@torch.inference_mode()
def generate_ids(model, input_ids, params: SamplingParams | None = None, attention_mask=None, *,
                 tokenizer=None, compile: bool = False, **kwargs) -> list[list[int]]:
    """New token ids for each prompt row (prefill once, then one cached step per token).

    ``input_ids``: LongTensor [B, T] (left-padded, with ``attention_mask``) or list(s) of ids.
    A row's output ends with its EOS / stop token when one was generated (transformers keeps it
    too). ``stop_strings`` need ``tokenizer``; the token that completes one ends the row.
    Keyword arguments override fields of ``params``. ``compile=True`` compiles the decode step
    (see `decode_step`): the first call pays the compilation (seconds), later calls reuse it.
    """
    params = SamplingParams.from_kwargs(params, **kwargs) if kwargs else (params or SamplingParams())
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = _as_batch(input_ids, attention_mask, pad)
    dev = model.device
    ids, mask = ids.to(dev), mask.to(dev)
    B, T = ids.shape
    if T >= cfg.block_size:
        raise ValueError(f"prompt of {T} tokens does not fit the model's context of {cfg.block_size}")
    limit = cfg.block_size - T
    if params.max_new_tokens is not None:
        limit = min(limit, params.max_new_tokens)
    if params.max_length is not None:
        limit = min(limit, params.max_length - T)  # transformers: total length (padding included)
    limit = max(limit, 0)
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=)")

    stop_ids = set(eos_ids_of(params, cfg, tokenizer)) | set(params.stop_token_ids)
    sampler = Sampler(B, cfg.vocab_size, dev)
    shared = None
    if params.do_sample:  # one generator for the batch, like transformers' global RNG
        shared = torch.Generator(device=dev)
        shared.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
    for b in range(B):
        real = ids[b][mask[b].bool()].tolist()
        sampler.set_row(b, params, real, stop_ids, generator=shared)
    out: list[list[int]] = [[] for _ in range(B)]
    if limit == 0:
        return out
    decoders = [StreamDecoder(tokenizer) for _ in range(B)] if params.stop_strings else None
    matchers = [StopMatcher(params.stop_strings) for _ in range(B)] if params.stop_strings else None

    from dhad.kv_cache import KVCache
    max_len = T + limit
    if compile:
        max_len = min(-(-max_len // _COMPILE_BUCKET) * _COMPILE_BUCKET, cfg.block_size)  # T + limit <= block_size
    cache = KVCache.empty(cfg, B, max_len, dtype=model.dtype, device=dev)
    step_fn = decode_step(model, compile)
    logits = model(ids, attention_mask=mask, cache=cache, keep=1)[:, -1]
    cache.static = compile  # decode steps: shapes independent of the fill level (the compiled graph's)
    done = [False] * B
    for step in range(limit):
        nxt = sampler(logits)
        if any(done):  # finished rows keep stepping (the batch stays rectangular) on padding
            nxt = torch.where(torch.tensor(done, device=dev), torch.full_like(nxt, pad), nxt)
        sampler.observe(nxt)
        toks = nxt.tolist()
        for b in range(B):
            if done[b]:
                continue
            out[b].append(toks[b])
            if toks[b] in stop_ids:
                done[b] = True
            elif matchers is not None:
                matchers[b].feed(decoders[b].push(toks[b]))
                done[b] = matchers[b].stopped
        if all(done) or step == limit - 1:
            break
        logits = step_fn(nxt[:, None], cache)
    return out


def generate_text(model, tokenizer, prompt_or_messages, fmt=None, params: SamplingParams | None = None,
                  compile: bool = False, **kwargs) -> str:
    """The answer to a prompt string or a chat conversation (``dhad.generate``).

    Messages are rendered with ``fmt`` (a format name or `ChatFormat`); by default the
    tokenizer's own chat_template, else the family's format from the model config. The format's
    turn-ending strings are added as stop strings and never returned; special tokens are dropped.
    """
    from dhad import prompts

    params = SamplingParams.from_kwargs(params, **kwargs) if kwargs else (params or SamplingParams())
    if isinstance(prompt_or_messages, str):  # a raw prompt: BOS where the tokenizer adds one
        text, add_special = prompt_or_messages, True
    else:  # a rendered chat carries its special tokens as text (apply_chat_template adds none)
        add_special = False
        if fmt is None:
            fmt = default_format(model, tokenizer)
        fmt = prompts.get_format(fmt) if not isinstance(fmt, prompts.ChatFormat) else fmt
        text = prompts.render(prompt_or_messages, fmt, add_generation_prompt=True)
        extra = tuple(s for s in fmt.stop_strings if s not in params.stop_strings)
        if extra:
            params = dataclasses.replace(params, stop_strings=params.stop_strings + extra)
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    new = generate_ids(model, [ids], params, tokenizer=tokenizer, compile=compile)[0]
    stop_ids = set(eos_ids_of(params, model.config, tokenizer)) | set(params.stop_token_ids)
    if new and new[-1] in stop_ids:
        new = new[:-1]
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    dec = StreamDecoder(tokenizer, skip_ids=special)
    stop = StopMatcher(params.stop_strings)
    out = []
    for t in new:
        out.append(stop.feed(dec.push(t)))
    out.append(stop.feed(dec.flush()))
    out.append(stop.flush())
    return "".join(out)


def default_format(model, tokenizer):
    """The chat format for a model (or its Config): the tokenizer's chat_template when it has one,
    else the family's built-in format (llama2 for the Llama layout, jais otherwise)."""
    from dhad import prompts
    template = getattr(tokenizer, "chat_template", None)
    if template:
        def tok_str(i):
            return tokenizer.id_to_token(i) if i is not None and hasattr(tokenizer, "id_to_token") else ""
        return prompts.format_from_template(template, tok_str(getattr(tokenizer, "bos_token_id", None)) or "",
                                            tok_str(getattr(tokenizer, "eos_token_id", None)) or "")
    layout = getattr(getattr(model, "config", model), "hf_layout", None) or "jais"
    return prompts.get_format("llama2" if layout == "llama" else "jais")
