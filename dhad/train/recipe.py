"""Training recipes: YAML -> dataclasses, validated with errors that name the field.

A recipe is everything a run needs and nothing else: the model (a preset or a directory to start
from), the data (token-shard directories, one per source), the objective (`type`), the optimizer,
the learning-rate schedule, the batch, an optional progressive context-extension schedule, an
optional mixture schedule (`stages`), precision and bookkeeping intervals. `load_recipe(path)`
parses and validates; paths are *not* checked here (a shipped recipe names data that only exists
on the machine that trains), `dhad.train.loop` checks them when a run starts.

Design choices
- One flat schema for every recipe type; what is specific to a type lives under `objective:` and
  is parsed by that objective (see `dhad.train.objectives`), so a new type (DPO) adds no fields here.
- Token counts accept the cards' spelling: `4T`, `1.2T`, `15B`, `283B`, `500M`, `64k` (decimal).
- Unknown keys are errors, not silently ignored: a typo in `weight_decay` must not train a model
  without weight decay.
- The batch is given either as `global_batch_size` (sequences per optimizer step across all
  processes; gradient accumulation is derived from the world size, so the same recipe gives the
  same optimisation on 1 or N devices) or as `micro_batch_size` x `grad_accum` per process.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

RECIPE_TYPES_BUILTIN = ("pretrain", "adapt", "sft")
PRECISIONS = ("bf16", "fp32")
STRATEGIES = ("auto", "none", "ddp", "fsdp")
NO_DECAY_KINDS = ("bias", "norm", "embedding")
TRAINABLE = ("all", "embeddings")


class RecipeError(ValueError):
    """A recipe that cannot be run as written: names the file and the field."""


# ---------------------------------------------------------------------------------------------
# Token counts

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(value: Any, where: str = "tokens") -> int:
    """`4T` -> 4_000_000_000_000; `1.2T`, `15B`, `500M`, `64k`, plain ints and floats."""
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected a token count like 15B or 1.2T, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        n = round(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(value))
        if not m:
            raise RecipeError(f"{where}: expected a token count like 15B or 1.2T, got {value!r}")
        n = round(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise RecipeError(f"{where}: must be positive, got {value!r}")
    return n


def format_tokens(n: float) -> str:
    """Short human form: 1234567 -> '1.23M'."""
    n = float(n)
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


# ---------------------------------------------------------------------------------------------
# Sections

@dataclass
class ModelSpec:
    preset: str | None = None  # a dhad.config preset name (fresh weights from init_weights(seed))
    init_from: str | None = None  # a dhad/HF model directory to continue from
    overrides: dict = field(default_factory=dict)  # Config fields to change (e.g. block_size for tiny runs)
    # FSDP2 only: build the model on the meta device, shard it, then fill each rank's shards tensor by
    # tensor (fresh init or init_from), so no process ever holds the whole model (70B-class runs).
    meta_init: bool = False


@dataclass
class DataSpec:
    # name -> shard directory holding `<train_split>/` and `<val_split>/` (ShardSet layout).
    sources: dict = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "validation"  # `dhad data prepare` writes <out>/train and <out>/validation
    shuffle: bool = True  # documents (pretrain) / rows (sft) in a seeded order per epoch


@dataclass
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # parameter kinds that get no weight decay (AdamW is decoupled: decay also scales with lr)
    no_decay: list = field(default_factory=lambda: ["bias", "norm", "embedding"])
    # muP (Cerebras, as Jais-family was trained): hidden weight matrices use lr * mup_width_scale.
    # "auto": when the model config has mup_width_scale; true/false force it on/off.
    mup: Any = "auto"
    fused: bool | None = None  # torch AdamW fused kernel (None: on for CUDA)


@dataclass
class ScheduleSpec:
    warmup_steps: int = 0
    total_steps: int | None = None  # None: from the stages' token budgets
    min_lr: float = 0.0
    decay: str = "cosine"  # cosine | linear | constant
    # Clock-driven (warmup-stable-decay): train until `seconds` of training wall time are spent, the
    # learning rate decaying over the last `decay_fraction` of them; total_steps is then only a cap.
    seconds: float | None = None
    decay_fraction: float = 0.2


@dataclass
class BatchSpec:
    micro_batch_size: int = 1
    grad_accum: int | None = None  # per process; derived from global_batch_size when that is given
    global_batch_size: int | None = None  # sequences per optimizer step over all processes
    seq_len: int | None = None  # sft: taken from the shards when omitted


@dataclass
class ContextPhase:
    """One phase of progressive context extension (2k -> 8k -> 16k in Jais-30b)."""
    seq_len: int
    until_step: int | None = None  # the phase ends before this optimizer step
    until_tokens: Any = None  # ... or once this many tokens have been trained on (whole run)
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    grad_accum: int | None = None


@dataclass
class Stage:
    """A stage of the mixture schedule: its token budget, source weights, what trains."""
    name: str | None = None
    tokens: Any = None  # budget (None: until the run ends; only for the last stage)
    mix: dict = field(default_factory=dict)  # source -> weight (normalised); empty: proportional to size
    trainable: str = "all"  # all | embeddings (adapt stage 1: backbone frozen)


@dataclass
class PeftSpec:
    """`peft:` (sft and dpo recipes): train LoRA adapters on a frozen base instead of the whole model
    (dhad.lora); with `quantize: nf4` the frozen base is stored in 4-bit NormalFloat (QLoRA)."""
    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False
    init: str = "default"  # PEFT's init_lora_weights: default (A Kaiming-uniform, B = 0) | gaussian
    quantize: str | None = None  # nf4: QLoRA
    double_quant: bool = True  # nf4: the block scales quantised too


@dataclass
class Recipe:
    type: str = "pretrain"
    name: str | None = None
    seed: int = 1234
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str | None = None  # copied into the final model directory
    data: DataSpec = field(default_factory=DataSpec)
    stages: list = field(default_factory=list)  # list[Stage]
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    context: list = field(default_factory=list)  # list[ContextPhase]
    precision: str = "bf16"
    compile: bool = False
    clip_grad: float | None = 1.0
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimizer steps; 0: only at the end
    eval_batches: int = 4  # micro batches of validation data per evaluation
    # validation sequences per source and evaluation; 0: eval_batches x micro_batch_size. Set it to compare
    # val_loss across runs with different micro batch sizes (the same sequences are scored).
    eval_sequences: int = 0
    log_every: int = 1
    peak_flops: float | None = None  # for MFU; None: measured with a large matmul at start
    distributed: str = "auto"  # auto (ddp when launched by torchrun) | none | ddp | fsdp
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str | None = None
    objective: dict = field(default_factory=dict)  # options of the recipe type's objective
    peft: PeftSpec | None = None  # LoRA / QLoRA adapters (sft, dpo): only they train
    source_file: str | None = None  # where the recipe was read from (not a YAML key)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def stage_list(self) -> list[Stage]:
        """The stages, or one unbounded stage over all sources when none are given."""
        return self.stages or [Stage(name="main")]

    def to_dict(self) -> dict:
        return _to_plain(self)


# ---------------------------------------------------------------------------------------------
# Parsing

def _to_plain(obj):
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "source_file"}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _expand(s: str) -> str:
    return os.path.expanduser(os.path.expandvars(s))


def _build(cls, d: Any, where: str):
    """Build dataclass `cls` from dict `d`, rejecting unknown keys and wrong scalar types."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(d).__name__} ({d!r})")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)} - {"source_file"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}" if where
                          else f"unknown top-level key(s) {unknown}; allowed: {sorted(known)}")
    kw = {}
    for k, v in d.items():
        kw[k] = _coerce(hints[k], v, f"{where}.{k}" if where else k)
    return cls(**kw)


def _coerce(tp, v, where):
    if v is None:
        return None
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None and type(None) in args:  # X | None
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
        origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise RecipeError(f"{where}: expected true/false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise RecipeError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    if tp is float:
        if isinstance(v, str):
            try:
                return float(v)  # YAML reads 2e-5 without a dot as a string
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise RecipeError(f"{where}: expected a string, got {v!r}")
        return v
    if tp is tuple or origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {v!r}")
        return tuple(v)
    if tp is list or origin is list:
        if not isinstance(v, list):
            raise RecipeError(f"{where}: expected a list, got {v!r}")
        return v
    if tp is dict or origin is dict:
        if not isinstance(v, dict):
            raise RecipeError(f"{where}: expected a mapping, got {v!r}")
        return v
    if is_dataclass(tp):
        return _build(tp, v, where)
    return v


def parse_recipe(d: dict, source: str = "<recipe>") -> Recipe:
    """A validated Recipe from a plain dict (what the YAML holds)."""
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(d).__name__}")
    d = dict(d)
    stages = d.pop("stages", None) or []
    context = d.pop("context", None) or []
    if not isinstance(stages, list):
        raise RecipeError(f"{source}: stages: expected a list of stages")
    if not isinstance(context, list):
        raise RecipeError(f"{source}: context: expected a list of phases")
    try:
        r = _build(Recipe, d, "")
        r.stages = [_build(Stage, s, f"stages[{i}]") for i, s in enumerate(stages)]
        r.context = [_build(ContextPhase, c, f"context[{i}]") for i, c in enumerate(context)]
        r.source_file = source
        validate(r)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return r


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe. `overrides`: `key.sub=value` strings (YAML values)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: invalid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e})") from None
    if d is None:
        raise RecipeError(f"{p}: the recipe is empty")
    for ov in overrides or []:
        apply_override(d, ov)
    return parse_recipe(d, str(p))


def apply_override(d: dict, spec: str) -> None:
    """`schedule.total_steps=20` -> d["schedule"]["total_steps"] = 20 (value parsed as YAML)."""
    if "=" not in spec:
        raise RecipeError(f"override {spec!r}: expected key.path=value")
    key, val = spec.split("=", 1)
    parts = key.strip().split(".")
    cur = d
    for k in parts[:-1]:
        if k.isdigit() and isinstance(cur, list):
            cur = cur[int(k)]
            continue
        cur = cur.setdefault(k, {})
        if not isinstance(cur, (dict, list)):
            raise RecipeError(f"override {spec!r}: {k} is not a section")
    last = parts[-1]
    value = yaml.safe_load(val)
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


# ---------------------------------------------------------------------------------------------
# Validation

def _known_types() -> tuple[str, ...]:
    try:
        from dhad.train.objectives import known_objectives
        return tuple(known_objectives())
    except ImportError:  # pragma: no cover - objectives imports torch; recipes alone do not need it
        return RECIPE_TYPES_BUILTIN


def validate(r: Recipe) -> None:
    types = _known_types()
    if r.type not in types:
        raise RecipeError(f"type: must be one of {list(types)}, got {r.type!r}")
    m = r.model
    if bool(m.preset) == bool(m.init_from):
        raise RecipeError("model: give exactly one of model.preset (fresh weights) or model.init_from (a model dir)")
    if m.preset:
        from dhad.config import PRESETS
        if m.preset not in PRESETS:
            raise RecipeError(f"model.preset: unknown preset {m.preset!r}; known: {sorted(PRESETS)}")
    if m.init_from:
        m.init_from = _expand(m.init_from)
    if r.tokenizer:
        r.tokenizer = _expand(r.tokenizer)
    if r.out_dir:
        r.out_dir = _expand(r.out_dir)

    # data
    if not r.data.sources:
        raise RecipeError("data.sources: name at least one shard directory, e.g. {en: shards/en}")
    for name, path in r.data.sources.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"data.sources: source names are short identifiers, got {name!r}")
        if not isinstance(path, str) or not path:
            raise RecipeError(f"data.sources.{name}: expected a directory path, got {path!r}")
        r.data.sources[name] = _expand(path)

    # stages / mixture
    for i, s in enumerate(r.stages):
        where = f"stages[{i}]" + (f" ({s.name})" if s.name else "")
        if s.name is None:
            s.name = f"stage{i + 1}"
        if s.tokens is not None:
            s.tokens = parse_tokens(s.tokens, f"{where}.tokens")
        elif i != len(r.stages) - 1:
            raise RecipeError(f"{where}.tokens: every stage but the last needs a token budget")
        if s.trainable not in TRAINABLE:
            raise RecipeError(f"{where}.trainable: must be one of {TRAINABLE}, got {s.trainable!r}")
        for src, w in s.mix.items():
            if src not in r.data.sources:
                raise RecipeError(f"{where}.mix: unknown source {src!r}; data.sources has {sorted(r.data.sources)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise RecipeError(f"{where}.mix.{src}: weight must be a number >= 0, got {w!r}")
        if s.mix and sum(s.mix.values()) <= 0:
            raise RecipeError(f"{where}.mix: weights sum to 0")
    names = [s.name for s in r.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"stages: names must be unique, got {names}")
    if r.type == "adapt":
        if len(r.stages) < 2 or r.stages[0].trainable != "embeddings":
            raise RecipeError("adapt: needs stages, the first with `trainable: embeddings` (backbone frozen) "
                              "and a later one with `trainable: all`")

    # optimizer
    o = r.optimizer
    if o.name != "adamw":
        raise RecipeError(f"optimizer.name: only 'adamw' is supported, got {o.name!r}")
    if not o.lr > 0:
        raise RecipeError(f"optimizer.lr: must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise RecipeError(f"optimizer.betas: expected two numbers in [0, 1), got {list(o.betas)}")
    o.betas = tuple(float(b) for b in o.betas)
    if isinstance(o.eps, str):
        o.eps = float(o.eps)
    if o.weight_decay < 0:
        raise RecipeError(f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    bad = [k for k in o.no_decay if k not in NO_DECAY_KINDS]
    if bad:
        raise RecipeError(f"optimizer.no_decay: unknown kind(s) {bad}; allowed: {list(NO_DECAY_KINDS)}")
    if o.mup not in ("auto", True, False):
        raise RecipeError(f"optimizer.mup: must be auto, true or false, got {o.mup!r}")

    # schedule
    sc = r.schedule
    if sc.decay not in ("cosine", "linear", "constant"):
        raise RecipeError(f"schedule.decay: must be cosine, linear or constant, got {sc.decay!r}")
    if sc.warmup_steps < 0:
        raise RecipeError("schedule.warmup_steps: must be >= 0")
    if sc.total_steps is not None and sc.total_steps <= 0:
        raise RecipeError("schedule.total_steps: must be > 0")
    if sc.total_steps is not None and sc.warmup_steps > sc.total_steps:
        raise RecipeError(f"schedule.warmup_steps ({sc.warmup_steps}) exceeds total_steps ({sc.total_steps})")
    if sc.min_lr < 0 or sc.min_lr > o.lr:
        raise RecipeError(f"schedule.min_lr: must be in [0, optimizer.lr={o.lr}], got {sc.min_lr}")
    if sc.total_steps is None and (not r.stages or r.stages[-1].tokens is None):
        raise RecipeError("schedule.total_steps: needed unless the last stage has a token budget")
    if sc.seconds is not None and not sc.seconds > 0:
        raise RecipeError(f"schedule.seconds: must be > 0, got {sc.seconds}")
    if not 0 < sc.decay_fraction <= 1:
        raise RecipeError(f"schedule.decay_fraction: must be in (0, 1], got {sc.decay_fraction}")

    # batch
    b = r.batch
    if b.micro_batch_size < 1:
        raise RecipeError("batch.micro_batch_size: must be >= 1")
    if b.grad_accum is not None and b.global_batch_size is not None:
        raise RecipeError("batch: give global_batch_size or grad_accum, not both")
    if b.grad_accum is not None and b.grad_accum < 1:
        raise RecipeError("batch.grad_accum: must be >= 1")
    if b.global_batch_size is not None and b.global_batch_size < 1:
        raise RecipeError(f"batch.global_batch_size: must be >= 1, got {b.global_batch_size}")
    if b.global_batch_size is not None and b.global_batch_size % b.micro_batch_size:
        raise RecipeError(f"batch.global_batch_size ({b.global_batch_size}) is not a multiple of "
                          f"micro_batch_size ({b.micro_batch_size})")
    if b.seq_len is not None and b.seq_len < 2:
        raise RecipeError("batch.seq_len: must be >= 2")
    if b.seq_len is None and r.type != "sft" and not r.context:
        raise RecipeError("batch.seq_len: needed (or a context schedule)")

    # context extension
    for i, c in enumerate(r.context):
        where = f"context[{i}]"
        if c.seq_len < 2:
            raise RecipeError(f"{where}.seq_len: must be >= 2")
        if c.until_tokens is not None:
            c.until_tokens = parse_tokens(c.until_tokens, f"{where}.until_tokens")
        if c.until_step is not None and c.until_tokens is not None:
            raise RecipeError(f"{where}: give until_step or until_tokens, not both")
        last = i == len(r.context) - 1
        if not last and c.until_step is None and c.until_tokens is None:
            raise RecipeError(f"{where}: every phase but the last needs until_step or until_tokens")
        for k in ("micro_batch_size", "global_batch_size", "grad_accum", "until_step"):
            if getattr(c, k) is not None and getattr(c, k) < 1:
                raise RecipeError(f"{where}.{k}: must be >= 1, got {getattr(c, k)}")
        mb = c.micro_batch_size or b.micro_batch_size
        if c.global_batch_size is not None and c.global_batch_size % mb:
            raise RecipeError(f"{where}.global_batch_size is not a multiple of the micro batch size {mb}")
    steps = [c.until_step for c in r.context if c.until_step is not None]
    if steps != sorted(steps):
        raise RecipeError("context: until_step values must increase")
    toks = [c.until_tokens for c in r.context if c.until_tokens is not None]
    if toks != sorted(toks):
        raise RecipeError("context: until_tokens values must increase")
    if r.context and r.type == "sft":
        raise RecipeError("context: sft rows have the fixed length of their shards; no context schedule")

    if r.precision not in PRECISIONS:
        raise RecipeError(f"precision: must be one of {PRECISIONS}, got {r.precision!r}")
    if r.distributed not in STRATEGIES:
        raise RecipeError(f"distributed: must be one of {STRATEGIES}, got {r.distributed!r}")
    if r.model.meta_init and r.distributed != "fsdp":
        raise RecipeError("model.meta_init: needs distributed: fsdp (the shards are what each process holds)")
    if r.model.meta_init and r.type == "dpo":
        raise RecipeError("model.meta_init: not supported for dpo recipes (the reference pass needs whole weights "
                          "before sharding); use distributed: fsdp without meta_init")
    if r.device not in ("auto", "cpu", "cuda"):
        raise RecipeError(f"device: must be auto, cpu or cuda, got {r.device!r}")
    for k in ("checkpoint_every", "eval_every", "eval_batches", "eval_sequences", "log_every"):
        if getattr(r, k) < 0:
            raise RecipeError(f"{k}: must be >= 0")
    if r.keep_checkpoints < 1:
        raise RecipeError("keep_checkpoints: must be >= 1")
    if r.clip_grad is not None and r.clip_grad <= 0:
        raise RecipeError("clip_grad: must be > 0 (or null for no clipping)")
    if r.peak_flops is not None and r.peak_flops <= 0:
        raise RecipeError("peak_flops: must be > 0 (or null to measure)")
    if r.peft is not None:
        _validate_peft(r)


def _validate_peft(r: Recipe) -> None:
    p = r.peft
    if r.type not in ("sft", "dpo"):
        raise RecipeError(f"peft: LoRA adapters are for sft and dpo recipes, not {r.type!r}")
    if p.method != "lora":
        raise RecipeError(f"peft.method: only 'lora' is supported, got {p.method!r}")
    from dhad.lora import TARGETS, LoraConfig, LoraError
    bad = [t for t in p.targets if t not in TARGETS]
    if bad or not p.targets:
        raise RecipeError(f"peft.targets: names among {list(TARGETS)}, got {list(p.targets)}")
    try:
        LoraConfig(r=p.r, alpha=p.alpha, dropout=p.dropout, targets=tuple(p.targets), rslora=p.rslora, init=p.init)
    except LoraError as e:
        field_ = next((f for f in ("r", "alpha", "dropout", "targets", "init") if str(e).startswith(f)), "r")
        raise RecipeError(f"peft.{field_}: {e}") from None
    if p.quantize not in (None, "nf4"):
        raise RecipeError(f"peft.quantize: must be nf4 or null, got {p.quantize!r}")
    if p.quantize and r.distributed == "fsdp":
        raise RecipeError("peft.quantize: nf4 (QLoRA) is a one-device method; FSDP shards float weights only "
                          "(use distributed: none or ddp, or LoRA without quantize)")
    if r.model.meta_init:
        raise RecipeError("peft: model.meta_init is not supported (adapters are added to whole weights before sharding)")
    if any(s.trainable != "all" for s in r.stages):
        raise RecipeError("peft: stages[].trainable does not apply (only the adapters train); leave it 'all'")


def shipped_recipes() -> list[Path]:
    """The YAML recipes that ship with dhad (top-level `recipes/`, or the installed package copy)."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "recipes", here.parents[1] / "recipes"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return sorted(cand.glob("*.yaml"))
    return []


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or the name of a shipped recipe (`tiny-pretrain` -> recipes/tiny-pretrain.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for q in shipped_recipes():
        if q.stem == name_or_path or q.name == name_or_path:
            return q
    known = [q.stem for q in shipped_recipes()]
    raise RecipeError(f"recipe not found: {name_or_path} (not a file; shipped recipes: {known})")
