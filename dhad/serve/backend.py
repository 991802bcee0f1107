"""What `dhad serve` and `dhad chat` share: an engine, its tokenizer, the chat format, the defaults.

    backend = load_backend("path/to/model_dir")          # loads model + tokenizer, builds an Engine
    backend = Backend.from_engine(engine, fmt="jais")     # or wrap an engine you built yourself
    backend = load_backend(d, adapters={"ar-chat": "adapters/ar-chat"})   # LoRA adapters in PEFT's format
    ids, params = backend.chat_request(messages, temperature=0.3)
    handle = backend.engine.submit(ids, params)

Design choices:
- The chat format comes from the checkpoint (its own ``chat_template`` wins, as in transformers),
  else from the family (`dhad.prompts.get_format`); ``--format`` overrides. The format's turn-end
  strings (e.g. "\\n[|Human|]") become stop strings, as `dhad.generate.generate_text` does, so a
  small model that forgets EOS still ends its turn.
- Generation defaults are transformers' (`SamplingParams()`), overlaid with the checkpoint's
  generation_config.json the way `model.generate` uses ``model.generation_config``: the card's
  endpoint then answers exactly like the card's transformers snippet.
- LoRA adapters are served beside the base model: each is a model id of its own (the OpenAI
  ``model`` field picks one per request), all sharing the engine, the tokenizer and the chat format.
- No web framework here: the terminal chat imports this without FastAPI.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from dhad import prompts
from dhad.generate import SamplingParams

# generation_config.json keys that mean the same thing in SamplingParams (transformers' names)
_GEN_CONFIG_KEYS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
                    "top_k", "top_p", "repetition_penalty")


def generation_defaults(model_dir: str | Path | None) -> SamplingParams:
    """transformers' defaults overlaid with the checkpoint's generation_config.json (unknown keys ignored)."""
    base = SamplingParams()
    if model_dir is None:
        return base
    f = Path(model_dir) / "generation_config.json"
    if not f.is_file():
        return base
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    kw = {k: cfg[k] for k in _GEN_CONFIG_KEYS if cfg.get(k) is not None}
    if "max_length" in kw and "max_new_tokens" not in kw:
        kw["max_new_tokens"] = None  # transformers: max_length alone bounds the total
    try:
        return SamplingParams.from_kwargs(base, **kw)
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None


def resolve_format(fmt=None, model_dir=None, tokenizer=None, config=None) -> prompts.ChatFormat:
    """The chat format: an explicit name/ChatFormat, else the model directory's, else the
    tokenizer's chat_template, else the family's built-in format (Llama layout -> Llama-2 [INST])."""
    if fmt is not None:
        return prompts.get_format(fmt)
    if model_dir is not None and Path(model_dir).is_dir():  # a GGUF file: its template is the tokenizer's
        return prompts.get_format(model_dir)
    from dhad.generate import default_format
    return default_format(config, tokenizer)


@dataclass
class Backend:
    engine: object                     # dhad.engine.Engine or dhad.vllm_engine.VLLMEngine
    tokenizer: object
    fmt: prompts.ChatFormat
    model_name: str = "dhad"
    defaults: SamplingParams = field(default_factory=SamplingParams)
    model_dir: Path | None = None

    @classmethod
    def from_engine(cls, engine, fmt=None, model_name: str | None = None, model_dir=None,
                    defaults: SamplingParams | None = None) -> "Backend":
        tok = getattr(engine, "tokenizer", None)
        if tok is None:
            raise ValueError("the engine has no tokenizer: build it with Engine(model, tokenizer)")
        fmt = resolve_format(fmt, model_dir, tok, getattr(engine, "config", None))
        name = model_name or (Path(model_dir).name if model_dir is not None else "dhad")
        return cls(engine, tok, fmt, name, defaults or generation_defaults(model_dir),
                   Path(model_dir) if model_dir else None)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The engine's LoRA adapters, each served as a model id beside the base model."""
        return tuple(getattr(self.engine, "adapter_names", ()))

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.adapter_names)

    def adapter_for(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` names: None for the base model (or no name), KeyError if unknown."""
        if name is None or name == self.model_name:
            return None
        if name in self.adapter_names:
            return name
        raise KeyError(name)

    @property
    def context(self) -> int:
        """Tokens the engine can hold per sequence (prompt + answer)."""
        return int(self.engine.max_seq_len)

    @property
    def max_new_tokens_limit(self) -> int:
        return int(self.engine.max_new_tokens_limit)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (dhad.tokenizer's one rule). Rendered chat prompts carry their special tokens
        as text (<s>, <|im_start|>): no BOS is added, as in apply_chat_template. A raw completion prompt is
        encoded with add_special_tokens=True: BOS where the tokenizer adds one, as in training."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_prompt(self, messages) -> list[int]:
        """Token ids of a conversation rendered in the chat format (raises prompts.PromptError)."""
        return self.encode(prompts.render(messages, self.fmt, add_generation_prompt=True))

    def chat_params(self, base: SamplingParams | None = None, **overrides) -> SamplingParams:
        """Sampling parameters for a chat turn: the format's turn-end strings are added as stops."""
        p = SamplingParams.from_kwargs(base or self.defaults, **overrides)
        extra = tuple(s for s in self.fmt.stop_strings if s not in p.stop_strings)
        return dataclasses.replace(p, stop_strings=p.stop_strings + extra) if extra else p


def load_backend(model_dir, *, dtype: str | None = None, device: str = "cpu", engine: str = "native",
                 fmt=None, model_name: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
                 max_new_tokens_limit: int = 4096, max_seq_len: int | None = None,
                 download: bool = False, engine_args: dict | None = None,
                 adapters: dict | None = None, quantize: str | None = None, group_size: int | None = None) -> Backend:
    """Load a model directory (``download``: a Hugging Face repo id, fetched) and build (not start) its engine.
    ``dtype`` None: float32 for the native engine, the checkpoint's for vLLM. ``engine_args``: extra
    `vllm.EngineArgs` (e.g. tensor_parallel_size, gpu_memory_utilization), vLLM only. ``adapters``:
    ``{name: directory}`` of LoRA adapters in PEFT's format, served beside the base model under those names.
    ``quantize`` / ``group_size``: weight-only quantisation (`dhad.load_model`), native engine only."""
    from dhad.checkpoint import resolve_model_dir
    from dhad.engine import make_engine
    from dhad.tokenizer import load_tokenizer

    d = resolve_model_dir(model_dir, download=download)
    name = model_name or d.resolve().name
    adapters = check_adapters(adapters, name)
    tok = load_tokenizer(d)
    kw = dict(max_batch_size=max_batch_size, max_queue=max_queue, max_new_tokens_limit=max_new_tokens_limit,
              max_seq_len=max_seq_len)
    if engine == "native":
        if engine_args:
            raise ValueError(f"engine arguments {sorted(engine_args)} are for --engine vllm")
        from dhad.checkpoint import load_model
        model = load_model(d, dtype=dtype or "float32", device=device, quantize=quantize, group_size=group_size)
        lora = None
        if adapters:
            from dhad.multi_lora import MultiLoRA
            lora = MultiLoRA.from_dirs(model, adapters)
        eng = make_engine(model, tok, "native", adapters=lora, **kw)
    else:
        if quantize is not None or group_size is not None:
            raise ValueError("quantize= is for the native engine; vLLM takes its own (engine_args quantization=...)")
        if adapters:
            kw["adapters"] = adapters
        eng = make_engine(d, tok, engine, dtype=dtype or "auto", **kw, **(engine_args or {}))
    return Backend.from_engine(eng, fmt=fmt, model_name=name, model_dir=d)


def check_adapters(adapters: dict | None, base_name: str) -> dict[str, Path]:
    """``{name: directory}`` with names usable as model ids (not the base model's) and existing directories."""
    out = {}
    for name, path in (adapters or {}).items():
        if not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > 256:
            raise ValueError(f"adapter name {name!r}: must be 1-256 characters without surrounding spaces")
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name; name the adapter differently")
        p = Path(path)
        if not p.is_dir():
            raise ValueError(f"adapter {name!r}: {p} is not a directory (expected adapter_config.json + "
                             "adapter_model.safetensors, PEFT's format)")
        out[name] = p
    return out
