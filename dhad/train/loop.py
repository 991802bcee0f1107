"""The training loop: one loop for every recipe type, from one CPU to FSDP on many GPUs.

    result = train("recipes/tiny-pretrain.yaml")            # or a Recipe
    result = train(recipe, resume=True)                      # continue from RUN/checkpoints/latest

Design choices (nanoGPT's loop, torchtitan's parallelism, Megatron's data blending):
- The recipe type is an `Objective` (dhad.train.objectives): it supplies batches and a loss; this
  file owns everything else, so pretrain, adapt, sft (and dpo) share one loop.
- A `Plan` (dhad.train.schedule) fixes before the first step what every step does (sequence
  length, batch shape, mixture stage); the `Mixture` (dhad.train.loader) hands out the global batch
  deterministically and each process keeps its slice, so the data never depends on world size.
- Exact global mean: each micro batch's summed loss is scaled by world_size / N, N = number of
  counted tokens in the *whole* global step (one all-reduce), because DDP/FSDP average gradients.
  1 process x accumulation and N processes give the same gradient up to float summation order.
- Precision: `bf16` = autocast to bfloat16 over fp32 master weights and fp32 optimizer state
  (FSDP2 adds a MixedPrecisionPolicy with fp32 gradient reduction); `fp32` = everything fp32 (the
  jais-adapted-70b-chat SFT was fp32).
- Adaptive pretraining: a stage with `trainable: embeddings` sets requires_grad only on the token
  (and position) embeddings and the LM head; frozen parameters get no gradient, and AdamW skips
  parameters without a gradient (no moment update, no weight decay), so the backbone stays
  bit-identical. DDP is rebuilt at a stage change (it fixes its parameter set when built); FSDP2
  follows requires_grad per step.
- Clock-driven runs (`schedule.seconds`): the run ends (final evaluation, checkpoint, model, as at
  its last step) once that much training wall time is spent, the learning rate following
  `lr_at_time` (warmup-stable-decay on the clock); total_steps only caps it. The seconds spent are
  saved with every checkpoint, so a resumed run continues the same clock.
- Stops cleanly: SIGTERM/SIGINT set a flag; after the current step every process checkpoints and
  the run returns `interrupted` (the CLI exits 128 + signal number). `resume=True` restores model,
  optimizer, RNG and the data position, so the loss sequence continues exactly, on any number of
  processes and under any strategy; an unreadable newest checkpoint is set aside and the one
  before it used.

Reading order: `train` -> `_train`, which runs the phases in turn: `_setup` (objective, model,
`_open_data`, `_place` on devices, optimizer) -> `_resume` -> `_open_run_dir` (metrics, logger)
-> `_steps` (the step loop) -> `_finish` (final evaluation, checkpoint, model directory).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from dhad.config import Config, ConfigError
from dhad.data.shards import ShardSet, tokenizer_hash
from dhad.model import Transformer
from dhad.train import distributed as D
from dhad.train.checkpointing import (
    CheckpointError,
    CheckpointMismatch,
    StopSignal,
    _write_json_atomic,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_aside,
)
from dhad.train.kernels import apply_training_kernels
from dhad.train.loader import Mixture
from dhad.train.metrics import MetricsLogger, measure_peak_flops, truncate_after
from dhad.train.objectives import Objective, get_objective
from dhad.train.optim import build_optimizer, set_lr
from dhad.train.recipe import Recipe, RecipeError, format_tokens, load_recipe
from dhad.train.schedule import Plan, build_plan, lr_at, lr_at_time
from dhad.utils import data_dir, tune_malloc


class TrainError(ValueError):
    """A run that cannot start as configured (missing data, mismatched tokenizer, ...)."""


@dataclass
class TrainResult:
    """What a run did. `model` is the trained module (FSDP-sharded in an FSDP run)."""
    run_dir: Path
    model_dir: Path | None  # RUN/model (None for a LoRA run: its product is the adapter)
    step: int  # optimizer updates done in total
    losses: list = field(default_factory=list)  # (step, train loss) of this session
    evals: list = field(default_factory=list)  # {"step", "val_loss", "val_loss_by_source"}
    interrupted: bool = False
    signal: int | None = None
    timed_out: bool = False  # stopped by max_seconds
    train_seconds: float = 0.0  # training wall seconds in total (all sessions), for clock-driven runs
    checkpoint: Path | None = None
    mixture: dict = field(default_factory=dict)
    plan: list = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    adapter_dir: Path | None = None  # RUN/adapter: a LoRA run's adapter in PEFT's format


# ---------------------------------------------------------------------------------------------
# Setup helpers

def default_data_root() -> Path:
    """Where relative paths in a recipe point: $DHAD_DATA_DIR, else the current directory."""
    return data_dir() or Path.cwd()


def resolve_paths(recipe: Recipe, data_root: str | os.PathLike | None) -> Recipe:
    """A copy of `recipe` whose relative paths (data sources, tokenizer, init_from) are taken from
    `data_root` (the CLI's --data; default `default_data_root()`) when they exist there, else from the
    current directory (e.g. `runs/<name>/model` written by an earlier recipe)."""
    root = Path(data_root) if data_root is not None else default_data_root()
    r = copy.deepcopy(recipe)

    def fix(p):
        if p is None or Path(p).is_absolute():
            return p
        q = root / p
        return str(q if q.exists() or not Path(p).exists() else Path(p).resolve())
    r.data.sources = {n: fix(p) for n, p in r.data.sources.items()}
    r.tokenizer = fix(r.tokenizer)
    r.model.init_from = fix(r.model.init_from)
    return r


def set_trainable(model: nn.Module, what: str) -> None:
    """`all`, or `embeddings`: only the token embeddings and the LM head train (adapt stage 1), through
    the adapt module's `freeze_for_stage` (the one definition of the card's two stages). A model with
    LoRA adapters keeps its own split: the adapters train, nothing else."""
    from dhad.lora import lora_layers
    if lora_layers(model):
        return
    from dhad.adapt import freeze_for_stage
    freeze_for_stage(model, 1 if what == "embeddings" else 2)


def build_model(recipe: Recipe) -> Transformer:
    """The model a recipe starts from: fresh (preset) or loaded (init_from). With model.meta_init the
    parameters stay on the meta device: `materialize` fills them once FSDP2 has sharded the model."""
    m = recipe.model
    if m.preset:
        try:
            cfg = Config.from_name(m.preset, **m.overrides)
        except (TypeError, ConfigError) as e:
            raise RecipeError(f"model.overrides: {e}") from None
        if m.meta_init:
            with torch.device("meta"):
                return Transformer(cfg)
        return Transformer(cfg).init_weights(recipe.seed)
    from dhad.checkpoint import CheckpointError, load_config, load_model
    p = Path(m.init_from)
    if not p.is_dir():
        raise TrainError(f"model.init_from: {p} is not a directory")
    try:
        if m.meta_init:
            with torch.device("meta"):
                model = Transformer(load_config(p))
        else:
            model = load_model(p, dtype="float32", device="cpu")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise TrainError(f"model.init_from: {e}") from None
    if m.overrides:
        # Only fields that change no tensor shape may be overridden on a trained model.
        ok = {"block_size", "rope_scaling", "alibi_scaling", "rope_theta", "bos_token_id", "eos_token_id",
              "pad_token_id"}
        bad = sorted(set(m.overrides) - ok)
        if bad:
            raise RecipeError(f"model.overrides: {bad} would change the shape of a trained model; allowed: {sorted(ok)}")
        try:
            model.config = model.config.replace(**m.overrides)
        except ConfigError as e:
            raise RecipeError(f"model.overrides: {e}") from None
    return model


def add_adapters(model: Transformer, recipe: Recipe) -> Transformer:
    """The recipe's `peft:` block: LoRA adapters on the frozen model (QLoRA: the base in NF4).
    Under bf16 the frozen parameters are stored in bf16 (they need no fp32 master copy, and autocast then
    keeps no bf16 copies of them): the adapters alone are fp32 master weights."""
    from dhad.lora import LoraConfig, LoraError, apply_lora
    p = recipe.peft
    if recipe.precision == "bf16":
        with torch.no_grad():
            for param in model.parameters():  # parameters only: buffers (RoPE tables, ALiBi slopes) stay fp32
                param.data = param.data.to(torch.bfloat16)
    try:
        cfg = LoraConfig(r=p.r, alpha=p.alpha, dropout=p.dropout, targets=tuple(p.targets), rslora=p.rslora,
                         init=p.init, base_model=recipe.model.init_from or recipe.model.preset)
        return apply_lora(model, cfg, seed=recipe.seed, quantize=p.quantize, double_quant=p.double_quant,
                          dtype=torch.float32)
    except LoraError as e:  # e.g. q without k and v on the Jais layout; bitsandbytes missing for nf4
        raise TrainError(f"peft: {e}") from None


def materialize(model: Transformer, recipe: Recipe, device) -> None:
    """Give a meta-device model (already sharded by FSDP2) real storage on ``device`` and fill it:
    the same values a whole-model build would have (same seeded init, or the init_from checkpoint),
    each rank writing only its shards."""
    model.to_empty(device=device)
    if recipe.model.preset:
        model.init_weights(recipe.seed, assign=D.assign_full)
    else:
        from dhad.checkpoint import load_into
        load_into(model, recipe.model.init_from, assign=D.assign_full)


def _tokenizer_path(recipe: Recipe) -> Path | None:
    if recipe.tokenizer:
        p = Path(recipe.tokenizer)
        if not p.exists():
            raise TrainError(f"tokenizer: {p} does not exist")
        return p
    if recipe.model.init_from:
        p = Path(recipe.model.init_from)
        if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
            return p
    return None


def _check_shards(recipe: Recipe, objective: Objective, paths: dict[str, Path], model_cfg: Config,
                  tok_path: Path | None) -> dict[str, ShardSet]:
    """Open every source's train split; check kind, vocabulary, tokenizer and sequence length."""
    sets = {}
    for name, path in paths.items():
        if not path.is_dir():
            raise TrainError(f"data.sources.{name}: shard directory {path} does not exist "
                             f"(run `dhad data prepare` first, or fix the path)")
        sets[name] = objective.open_shards(name, path, recipe.data.train_split)
        if sets[name].n_docs == 0:
            raise TrainError(f"data.sources.{name}: {sets[name].path} holds no documents/rows (everything was "
                             "filtered out when the shards were made? see the report next to them)")
    hashes = {n: s.meta.get("tokenizer_hash") for n, s in sets.items() if s.meta.get("tokenizer_hash")}
    if len(set(hashes.values())) > 1:
        raise TrainError(f"data.sources were tokenized with different tokenizers: {hashes}")
    if tok_path is not None and hashes:
        want = next(iter(hashes.values()))
        have = {tokenizer_hash(tok_path)}
        try:
            from dhad.tokenizer import load_tokenizer
            have.add(load_tokenizer(tok_path).hash())
        except Exception:  # noqa: BLE001 - the file hash alone decides then
            pass
        if want not in have:
            raise TrainError(f"tokenizer {tok_path} does not match the shards (shards: {want}, "
                             f"tokenizer: {sorted(h for h in have if h)})")
    for name, s in sets.items():
        v = int(s.meta.get("vocab_size", 0))
        if v > model_cfg.vocab_size:
            raise TrainError(f"data.sources.{name}: shards use a vocabulary of {v} tokens, the model has "
                             f"{model_cfg.vocab_size}")
    return sets


def _sft_seq_len(recipe: Recipe, sets: dict[str, ShardSet]) -> int | None:
    lens = {n: s.seq_len for n, s in sets.items() if s.seq_len}
    if not lens:
        return None
    if len(set(lens.values())) > 1:
        raise TrainError(f"sft sources have different row lengths: {lens}")
    T = next(iter(lens.values()))
    if recipe.batch.seq_len is not None and recipe.batch.seq_len != T:
        raise TrainError(f"batch.seq_len is {recipe.batch.seq_len} but the sft shards have rows of {T} tokens")
    return T


def stage_weights(recipe: Recipe, sets: dict[str, ShardSet]) -> list[dict]:
    """Each stage's mixture weights; an empty `mix` means proportional to the sources' sizes."""
    out = []
    for st in recipe.stage_list:
        out.append(dict(st.mix) if st.mix else {n: float(s.n_tokens) for n, s in sets.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, objective: Objective, val_sets: dict[str, list], micro_bs: int, env: D.DistEnv,
             autocast) -> dict:
    """Mean loss per validation source and over all of them (token-weighted). Batches are spread
    over processes in lockstep (FSDP needs every rank in every forward)."""
    by_src, tot_s, tot_n = {}, 0.0, 0.0
    for name, items in val_sets.items():
        batches = [items[i:i + micro_bs] for i in range(0, len(items), micro_bs)]
        rounds = math.ceil(len(batches) / env.world_size)
        acc = torch.zeros(2, dtype=torch.float64)
        for r in range(rounds):
            k = r * env.world_size + env.rank
            real = k < len(batches)
            batch = objective.collate(batches[k if real else 0], env.device)
            if not real:  # run only so every rank joins every forward: the objective must not count it
                batch["lockstep_only"] = True
            with autocast():
                s, n = objective.loss(model, batch)
            if real:
                acc += torch.tensor([float(s), float(n)], dtype=torch.float64)
        acc = D.all_reduce_sum(acc, env) if env.distributed else acc
        by_src[name] = float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")
        tot_s += float(acc[0])
        tot_n += float(acc[1])
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's parameters unsharded after a no-grad forward: .parameters() would then
        # list plain tensors whose .grad stays None (grad norm / clipping miss the embeddings and LM head)
        # and a checkpoint would record no optimizer state for them. Put the sharded ones back.
        model.reshard()
    return {"val_loss": tot_s / tot_n if tot_n else float("nan"), "val_loss_by_source": by_src}


# ---------------------------------------------------------------------------------------------
# The loop

def train_step(model, objective: Objective, batches: list[dict], optimizer, env: D.DistEnv,
               strategy: str = "none", autocast=contextlib.nullcontext, clip: float | None = None,
               params: list | None = None) -> tuple[float, float | None]:
    """One optimizer step over this process's micro batches. Returns (the mean loss over the *global*
    batch, the gradient norm before clipping). The benchmark drives other models through this too."""
    counts = torch.stack([torch.as_tensor(objective.count(b), dtype=torch.float64).cpu() for b in batches])
    n_global = float(D.all_reduce_sum(counts.sum().reshape(1), env).item())
    scale = env.world_size / max(n_global, 1.0)  # DDP / FSDP average over processes: undo, then / N
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    for k, b in enumerate(batches):
        with D.grad_sync(model, strategy, k == len(batches) - 1):
            with autocast():
                s, _ = objective.loss(model, b)
            (s * scale).backward()
        loss_sum += s.detach().double()
    loss = float(D.all_reduce_sum(loss_sum.reshape(1), env).item()) / max(n_global, 1.0)
    gn = None
    if clip:
        params = params if params is not None else list(D.unwrap(model).parameters())
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        fused = all(g.get("fused") for g in optimizer.param_groups)
        if fused and grads and not any(hasattr(g, "full_tensor") for g in grads):
            gn = _clip_into_fused_step(optimizer, grads, clip)
        else:
            gn = torch.nn.utils.clip_grad_norm_(with_grad, clip)
            gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            optimizer.step()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, gn


def _clip_into_fused_step(optimizer, grads: list[torch.Tensor], clip: float) -> float:
    """clip_grad_norm_ + step in fewer passes over the gradients, for a fused AdamW on plain tensors:
    the squared norm per tensor as a BLAS dot product (2.5x faster than torch's norm kernels on CPU), and
    the clipping factor handed to the fused kernel as the `grad_scale` it divides every gradient by (the
    attribute torch.amp.GradScaler sets) instead of a separate in-place multiply. Returns the norm
    before clipping, as clip_grad_norm_ does (same coefficient: clip / (norm + 1e-6), at most 1)."""
    sq = [torch.dot(g.view(-1), g.view(-1)) if g.dtype == torch.float32 and g.is_contiguous()
          else torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads]
    norm = torch.stack([s.to(grads[0].device) for s in sq]).sum().sqrt()
    coef = (clip / (norm + 1e-6)).clamp(max=1.0)
    optimizer.grad_scale = coef.reciprocal().reshape(1)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return float(norm)


def train(recipe: Recipe | str | os.PathLike, *, resume: bool = False, run_dir: str | os.PathLike | None = None,
          data_root: str | os.PathLike | None = None, stop_at: int | None = None, max_seconds: float | None = None,
          progress: bool = True,
          overrides: list[str] | None = None, save_final: bool = True) -> TrainResult:
    """Run a recipe. `stop_at`: stop after that many optimizer updates (checkpoint, as on SIGTERM).
    `max_seconds`: a wall-clock budget for this session's training steps (from the first step, so
    setup is not counted): the first step that ends past it checkpoints and stops the run as
    `interrupted` (resumable), the same on every rank (rank 0's clock decides).
    `data_root`: directory that relative data paths in the recipe are taken from."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to recipe files; edit the Recipe object instead")
    recipe = resolve_paths(recipe, data_root)
    env = D.init_distributed(recipe.device)
    try:
        return _train(recipe, env, resume=resume, run_dir=run_dir, stop_at=stop_at, max_seconds=max_seconds,
                      progress=progress, save_final=save_final)
    finally:
        D.shutdown(env)


@dataclass
class _Run:
    """What a run holds from setup to the end: the pieces `_train`'s phases share."""
    recipe: Recipe
    env: D.DistEnv
    run_dir: Path
    strategy: str
    objective: Objective
    paths: dict  # source -> shard directory
    tok_path: Path | None
    plan: Plan
    mixture: Mixture
    wrapped: nn.Module  # what the loop calls: the model, a DDP wrapper, or the FSDP-sharded model
    optimizer: torch.optim.Optimizer
    stage: int  # index into recipe.stage_list of the stage the model is set up for
    log: MetricsLogger | None = None
    peak: float | None = None  # FLOP/s for MFU
    result: TrainResult | None = None
    trained_s: float = 0.0  # training wall seconds before this session (from the checkpoint resumed)
    clock0: float | None = None  # perf_counter() at which the run's training clock reads 0

    def train_seconds(self) -> float:
        """Training wall seconds so far, all sessions (the clock a clock-driven schedule follows)."""
        return time.perf_counter() - self.clock0 if self.clock0 is not None else self.trained_s

    @property
    def model(self) -> Transformer:
        return D.unwrap(self.wrapped)

    @property
    def do_eval(self) -> bool:
        return self.recipe.eval_batches > 0

    def autocast(self):
        if self.recipe.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_stage(self, stage: int) -> None:
        """Make `stage`'s parameters trainable; DDP fixes its parameter set when built, so rebuild it."""
        self.stage = stage
        set_trainable(self.model, self.recipe.stage_list[stage].trainable)
        if self.strategy == "ddp":
            self.wrapped = D.wrap_model(self.model, "ddp", self.env, self.recipe.precision)


def _train(recipe: Recipe, env: D.DistEnv, *, resume, run_dir, stop_at, progress, save_final, max_seconds=None):
    run_dir = Path(run_dir or recipe.out_dir or Path("runs") / (recipe.name or Path(recipe.source_file or "run").stem))
    if not resume and latest_checkpoint(run_dir) is not None:
        raise TrainError(f"{run_dir} already holds checkpoints; pass --resume to continue, or choose another run dir")
    run = _setup(recipe, env, run_dir, progress)
    start = _resume(run) if resume else 0
    _open_run_dir(run, resume, start, progress)
    if run.do_eval and start == 0 and recipe.eval_every:
        _run_eval(run, 0)
    step = _steps(run, start, stop_at, max_seconds)
    return _finish(run, step, save_final)


def _setup(recipe: Recipe, env: D.DistEnv, run_dir: Path, progress: bool) -> _Run:
    """Objective, model, data (plan and mixture), the model placed and wrapped, the optimizer."""
    strategy = D.resolve_strategy(recipe.distributed, env)
    if env.device.type == "cpu":
        tune_malloc()  # reuse activation buffers' pages step after step (dhad.utils.tune_malloc)
    torch.manual_seed(recipe.seed)
    objective = get_objective(recipe.type, recipe.objective)
    objective.progress = progress  # an objective's own long passes (DPO's reference) show a bar only if asked
    model = apply_training_kernels(build_model(recipe))
    if recipe.peft is not None:
        add_adapters(model, recipe)
    paths, tok_path, plan, mixture = _open_data(recipe, env, objective, model.config)
    stage = plan.at(0).stage
    set_trainable(model, recipe.stage_list[stage].trainable)
    wrapped = _place(model, recipe, env, strategy, objective, run_dir)
    optimizer = build_optimizer(model, recipe.optimizer, model.config, env.device.type,
                                adapters_only=recipe.peft is not None)
    return _Run(recipe, env, run_dir, strategy, objective, paths, tok_path, plan, mixture, wrapped, optimizer, stage)


def _open_data(recipe: Recipe, env: D.DistEnv, objective: Objective, cfg: Config):
    """Check the sources against the model and tokenizer; the plan of every step; the mixture that
    hands out each step's batch. Returns (paths, tokenizer path, plan, mixture)."""
    paths = {n: Path(p) for n, p in recipe.data.sources.items()}
    tok_path = _tokenizer_path(recipe)
    sets = _check_shards(recipe, objective, paths, cfg, tok_path)
    seq_default = _sft_seq_len(recipe, sets) if objective.expected_kind == "sft" else None
    plan = build_plan(recipe, env.world_size, seq_default)
    max_T = max(s.seq_len for s in plan.segments)
    if cfg.position == "learned" and max_T > cfg.block_size:
        raise TrainError(f"sequence length {max_T} exceeds the model's {cfg.block_size} learned positions")
    streams = {n: objective.open_source(n, paths[n], recipe.data.train_split, recipe.seed, recipe.data.shuffle)
               for n in paths}
    mixture = Mixture(streams, plan, stage_weights(recipe, sets), plan.stage_names)
    if recipe.eval_batches > 0:
        for n, p in paths.items():
            if not (p / recipe.data.val_split / "index.json").is_file():
                raise TrainError(f"data.sources.{n}: no validation split at {p / recipe.data.val_split} "
                                 f"(prepare one, or set eval_batches: 0)")
    return paths, tok_path, plan, mixture


def _place(model: Transformer, recipe: Recipe, env: D.DistEnv, strategy: str, objective: Objective,
           run_dir: Path) -> nn.Module:
    """The model on this process's device, compiled if asked, wrapped for DDP / FSDP (a meta-device
    model is filled after sharding); the objective set up on it. Returns what the loop calls."""
    meta = recipe.model.meta_init
    if not meta:
        model.to(env.device)
        objective.setup(model, recipe, env.device, run_dir=run_dir)
    if recipe.compile:
        if strategy == "fsdp":
            for b in model.h:
                b.compile()
        else:
            model.compile()
    wrapped = D.wrap_model(model, strategy, env, recipe.precision)
    if meta:  # sharded while still on the meta device: now each rank fills its own shards
        materialize(model, recipe, env.device)
        objective.setup(model, recipe, env.device, run_dir=run_dir)
    return wrapped


def _resume(run: _Run) -> int:
    """Restore model, optimizer, RNG and data position from the newest readable checkpoint; returns
    its step. One that cannot be read (a corrupt file, garbage JSON) is set aside as
    `checkpoints/.corrupt-step_N`, with a warning, and the one before it is tried; every process
    makes the same choice."""
    env = run.env
    candidates = complete_checkpoints(run.run_dir)
    if not candidates:
        raise TrainError(f"--resume: no checkpoint in {run.run_dir / 'checkpoints'}")
    failed = []
    for ck in candidates:
        err = None
        try:
            meta = load_checkpoint(ck, run.wrapped, run.optimizer, env)
            try:
                run.mixture.load_state_dict(meta["data"])
                start = int(meta["step"])
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{ck / 'meta.json'}: bad data position or step ({type(e).__name__}: {e})") from None
        except CheckpointMismatch as e:  # readable, but another model's: nothing to fall back on
            raise TrainError(f"cannot resume: {e}") from None
        except CheckpointError as e:
            err = str(e)
        if not D.any_flag(err is not None, env):
            break
        failed.append(f"{ck.name}: {err or 'unreadable on another process'}")
        aside = set_aside(ck, env)
        if err is not None or env.is_main:
            print(f"warning: cannot resume from {ck}: {err or 'unreadable on another process'}; moved it to "
                  f"{aside.name} and trying the checkpoint before it", flush=True)
        run.optimizer.state.clear()  # a partial load must not leave state for the next candidate
    else:
        raise TrainError(f"cannot resume: no readable checkpoint in {run.run_dir / 'checkpoints'} ("
                         + "; ".join(failed) + "). The unreadable ones are kept as .corrupt-step_*; start a new "
                         "run (another --out) or restore them from a backup")
    if meta.get("plan") and meta["plan"] != [_seg_key(s) for s in run.plan.segments if s.start < start]:
        if env.is_main:
            print(f"warning: the recipe's plan for steps < {start} differs from the checkpoint's; "
                  "the data stream continues from the saved position", flush=True)
    if start < run.plan.total_steps:
        run.set_stage(run.plan.at(start).stage)
    run.trained_s = float(meta.get("train_seconds", 0.0))
    return start


def _open_run_dir(run: _Run, resume: bool, start: int, progress: bool) -> None:
    """Write the recipe as run, bring metrics.jsonl to `start`, open the logger, log start/resume."""
    recipe, env = run.recipe, run.env
    metrics_path = run.run_dir / "metrics.jsonl"
    if env.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))
        if resume:
            truncate_after(metrics_path, start)  # records after the checkpoint are logged again
        elif metrics_path.exists():  # an earlier attempt stopped before its first checkpoint: it starts over
            print(f"{metrics_path}: replacing the records of an earlier attempt that left no checkpoint", flush=True)
            metrics_path.unlink()
    D.barrier(env)
    peak = recipe.peak_flops or measure_peak_flops(env.device, torch.bfloat16 if recipe.precision == "bf16"
                                                   else torch.float32)
    total = None if recipe.schedule.seconds else run.plan.total_steps  # clock-driven: the steps are not known
    run.log = MetricsLogger(metrics_path, total, start, progress, enabled=env.is_main,
                            desc=recipe.name or recipe.type)
    run.log.log({"event": "resume" if resume else "start", "step": start, "total_steps": run.plan.total_steps,
                 "world_size": env.world_size, "strategy": run.strategy, "precision": recipe.precision,
                 "meta_init": recipe.model.meta_init, "params": run.model.num_params(), "peak_flops": peak,
                 "plan": run.plan.summary(), "time": time.time()})
    run.peak = peak
    run.result = TrainResult(run_dir=run.run_dir, model_dir=None, step=start, plan=run.plan.summary())


def _checkpoint(run: _Run, step: int) -> Path:
    plan, mixture = run.plan, run.mixture
    meta = {"data": mixture.state_dict(), "plan": [_seg_key(s) for s in plan.segments if s.start < step],
            "tokens": plan.tokens_before(step), "recipe": run.recipe.to_dict(), "mixture": mixture.report(),
            "train_seconds": run.train_seconds()}
    ck = save_checkpoint(run.run_dir, step, run.wrapped, run.optimizer, meta, run.env, run.recipe.keep_checkpoints)
    if run.recipe.peft is not None:  # beside the training state: the adapter as PEFT reads it
        save_adapter_dir(run.wrapped, ck / "adapter", run.env)
    return ck


def _run_eval(run: _Run, step: int) -> dict:
    recipe, plan = run.recipe, run.plan
    T = plan.at(min(step, plan.total_steps - 1)).seq_len
    n_val = recipe.eval_sequences or recipe.eval_batches * recipe.batch.micro_batch_size
    vs = {n: run.objective.val_items(n, p, recipe.data.val_split, T, n_val) for n, p in run.paths.items()}
    ev = evaluate(run.wrapped, run.objective, vs, recipe.batch.micro_batch_size, run.env, run.autocast)
    rec = {"step": step, **ev, **run.objective.eval_metrics()}
    run.log.log({"event": "eval", **rec})
    run.log.write(f"step {step}: val_loss {ev['val_loss']:.4f} "
                  + " ".join(f"{k}={v:.4f}" for k, v in ev["val_loss_by_source"].items()))
    run.result.evals.append(rec)
    return ev


class _Meter:
    """Throughput between logged steps: tokens/s and MFU; time spent evaluating or checkpointing is
    not training time (`pause`)."""

    def __init__(self, run: _Run, start: int):
        self.run, self.last_step, self.tokens = run, start, run.plan.tokens_before(start)
        self.t0 = self.t_last = time.perf_counter()

    def pause(self) -> None:
        self.t_last = time.perf_counter()

    def log(self, step: int, seg, loss: float, lr: float, grad_norm: float | None) -> None:
        run = self.run
        now, toks = time.perf_counter(), run.plan.tokens_before(step)
        extra = run.objective.metrics()
        # tokens the model really ran, when the objective counts them (DPO: pairs have no fixed length),
        # else the plan's tokens
        tps = extra.get("tokens_processed", toks - self.tokens) / max(now - self.t_last, 1e-9)
        mfu = run.model.config.flops_per_token(seg.seq_len) * tps / run.peak if run.peak else None
        run.log.step({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": toks,
                      "seq_len": seg.seq_len, "stage": run.plan.stage_names[seg.stage], "tokens_per_s": tps,
                      "mfu": mfu, "elapsed_s": now - self.t0, **extra}, n=step - self.last_step)
        self.t_last, self.tokens, self.last_step = now, toks, step


def _steps(run: _Run, start: int, stop_at: int | None, max_seconds: float | None) -> int:
    """Optimizer steps from `start` until the plan ends, a signal, `stop_at` or the time budget (then
    checkpoint); periodic evaluations and checkpoints on the way. Returns the step reached."""
    recipe, env, plan, result = run.recipe, run.env, run.plan, run.result
    step, meter = start, _Meter(run, start)
    params = list(run.model.parameters())
    sc, timed = recipe.schedule, recipe.schedule.seconds  # timed: a clock-driven run of that many seconds
    run.clock0, dt_step = meter.t0 - run.trained_s, 0.0
    with StopSignal() as sig:
        while step < plan.total_steps:
            seg = plan.at(step)
            if seg.stage != run.stage:
                run.set_stage(seg.stage)
                st = recipe.stage_list[seg.stage]
                run.log.log({"event": "stage", "step": step, "stage": st.name, "trainable": st.trainable,
                             "mixture": run.mixture.report()})  # tokens seen per stage and source so far
                run.log.write(f"step {step}: stage {st.name} (trainable: {st.trainable})")
            t_step = time.perf_counter()
            if timed:  # rank 0's clock decides, so every rank uses the same rate
                lr = D.broadcast_object(lr_at_time(step, run.train_seconds(), timed, recipe.optimizer.lr,
                                                   sc.warmup_steps, sc.min_lr, sc.decay, sc.decay_fraction), env)
            else:
                lr = lr_at(step, recipe.optimizer.lr, sc.warmup_steps, plan.total_steps, sc.min_lr, sc.decay)
            set_lr(run.optimizer, lr)
            sb = run.mixture.next_step(env.rank, env.world_size)
            batches = [run.objective.collate(items, env.device) for items in sb.micro]
            loss, gn = train_step(run.wrapped, run.objective, batches, run.optimizer, env, run.strategy,
                                  run.autocast, recipe.clip_grad, params)
            step += 1
            dt_step = time.perf_counter() - t_step
            result.losses.append((step, loss))
            if not math.isfinite(loss):
                run.log.write(f"step {step}: loss is {loss}; stopping (checkpoint kept from before)")
                raise TrainError(f"loss became {loss} at step {step}")
            if recipe.log_every and (step % recipe.log_every == 0 or step == plan.total_steps):
                meter.log(step, seg, loss, lr, gn)
            if run.do_eval and recipe.eval_every and step % recipe.eval_every == 0 and step < plan.total_steps:
                _run_eval(run, step)
                meter.pause()

            out_of_time = max_seconds is not None and D.any_flag(  # rank 0's clock decides for all
                env.is_main and time.perf_counter() - meter.t0 >= max_seconds, env)
            stop_now = D.any_flag(sig.stop, env) or out_of_time or (stop_at is not None and step >= stop_at)
            # clock-driven: the run ends at the step whose end is nearest to its seconds
            time_up = bool(timed) and D.any_flag(env.is_main and run.train_seconds() + 0.5 * dt_step >= timed, env)
            if step == plan.total_steps or (time_up and not stop_now):
                if time_up:
                    run.log.write(f"step {step}: {timed:g} s of training spent; the run ends here")
                break  # _finish checkpoints the end
            if stop_now or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0):
                result.checkpoint = _checkpoint(run, step)
                meter.pause()
            if stop_now:
                result.interrupted, result.signal, result.timed_out = True, sig.signum, bool(out_of_time)
                run.log.write(f"stopped at step {step}" + (f" (signal {sig.signum})" if sig.signum else "")
                              + (f" (time budget of {max_seconds:g} s)" if out_of_time else "")
                              + f"; resume with --resume from {result.checkpoint}")
                break
    return step


def _finish(run: _Run, step: int, save_final: bool) -> TrainResult:
    """Final evaluation, checkpoint and model directory (unless interrupted); mixture.json; end event."""
    env, result, log = run.env, run.result, run.log
    result.step = step
    result.train_seconds = run.train_seconds()
    result.model = run.model
    result.mixture = run.mixture.report()
    if not result.interrupted:
        if run.do_eval:
            _run_eval(run, step)
        result.checkpoint = _checkpoint(run, step)
        if save_final and run.recipe.peft is not None:
            result.adapter_dir = save_adapter_dir(run.wrapped, run.run_dir / "adapter", env)
        elif save_final:
            result.model_dir = save_final_model(run.wrapped, run.run_dir / "model", run.tok_path, env)
    if env.is_main:
        _write_json_atomic(run.run_dir / "mixture.json", {"step": step, "stages": result.mixture,
                                                          "plan": run.plan.summary()})
    log.log({"event": "end", "step": step, "interrupted": result.interrupted, "mixture": result.mixture,
             "time": time.time()})
    log.close()
    if env.is_main and not result.interrupted:
        print(format_mixture(result.mixture), flush=True)
    return result


def _seg_key(s) -> list:
    return [s.start, s.end, s.stage, s.seq_len, s.global_seqs]


def save_adapter_dir(model, out: Path, env: D.DistEnv) -> Path:
    """A LoRA run's adapters (gathered from FSDP shards when sharded) as a PEFT adapter directory."""
    from dhad.lora import save_adapter
    inner = D.unwrap(model)
    sd = {}
    for n, p in inner.named_parameters():  # the adapters alone, gathered (collective under FSDP2)
        if ".lora_A." in n or ".lora_B." in n:
            sd[n] = (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().cpu()
    if env.is_main:
        save_adapter(inner, out, state_dict=sd)
    D.barrier(env)
    return out


def save_final_model(model, out: Path, tok_path: Path | None, env: D.DistEnv) -> Path:
    """The run's product: a dhad / Hugging Face model directory (+ tokenizer files)."""
    from dhad.checkpoint import save_model
    sd = D.full_state_dict(model)
    if env.is_main:
        cfg = D.unwrap(model).config
        with torch.device("meta"):
            fresh = Transformer(cfg)
        fresh.load_state_dict(sd, assign=True)
        if cfg.tie_embeddings:
            fresh.lm_head.weight = fresh.wte.weight
        tok = None
        if tok_path is not None:
            from dhad.tokenizer import load_tokenizer
            tok = load_tokenizer(tok_path)
        save_model(fresh, out, tokenizer=tok)
    D.barrier(env)
    return out


def format_mixture(report: dict) -> str:
    """A small table of tokens seen per stage and source."""
    lines = ["tokens seen per stage and source:"]
    for stage, srcs in report.items():
        parts = [f"{n} {format_tokens(v['tokens'])} ({100 * v['share']:.1f}%)" for n, v in srcs.items() if v["tokens"]]
        lines.append(f"  {stage:>{max(map(len, report))}}: " + ", ".join(parts))
    return "\n".join(lines)


def load_mixture_report(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "mixture.json").read_text(encoding="utf-8"))
