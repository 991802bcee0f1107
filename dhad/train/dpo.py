"""Preference alignment: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on chosen/rejected pairs.

The stage after SFT that ALLaM-2-7b-instruct went through (its card lists 260K preference pairs; it gives
no hyperparameters). This module holds everything DPO-specific; the training loop (optimizer, schedule,
accumulation, bf16, FSDP2, checkpoints, resume, progress, JSONL metrics) is the same loop every recipe
uses: `DPOObjective` is the loss + batch source it calls.

Design choices
- **One forward for both answers.** Chosen and rejected go through the policy together, never as two
  calls. Two layouts, same numbers (tests check both against TRL):
  * ``share_prompt=True`` (default): one row per pair, ``prompt + chosen + rejected``, as a token tree
    (the eval engine's layout): both answers sit at the positions that follow the prompt and see the
    prompt and themselves only, through the model's "may attend" mask (`Transformer.hidden_states`). The
    prompt is computed once and both answers' gradients flow into it. Prompts are usually much longer
    than answers (QA context, multi-turn history), so this nearly halves the tokens processed per step.
    The last layer and the LM head run only at the positions that predict answer tokens. It is one
    plain forward, so DDP and FSDP2 wrap it like any other (no KV cache in training).
  * ``share_prompt=False``: TRL's layout, ``[prompt+chosen ; prompt+rejected]`` right-padded, ``[2B, T]``.
- **Reference log-probabilities** ``log π_ref(y|x)`` (summed over answer tokens), either
  * ``precomputed``: one no-grad pass of the initial model over all pairs before step 1, cached beside the
    run (``RUN/ref_logps/<split>-<source>.safetensors``, keyed by the reference model's fingerprint, the
    pair ids and the precision), so a resumed run reuses it. No second model in memory and no reference forward per step: the default on CPU;
  * ``frozen``: a frozen copy of the initial model evaluated on the fly (TRL's default); the default on
    accelerators, where the upfront pass would delay the first step.
  Both give the same numbers (tested).
- **Losses** (per pair, then the mean over the batch):
  sigmoid (DPO, eq. 7):  -(1-ε)·logσ(β·Δ) - ε·logσ(-β·Δ), Δ = (log π/π_ref)(y_w) - (log π/π_ref)(y_l);
      ε = label smoothing (conservative DPO, Mitchell 2023); ε = 0 is the paper's loss.
  ipo (eq. 17):          (Δ̄ - 1/(2β))², Δ̄ with each log-ratio divided by its answer's token count (TRL's
      normalisation, which it confirmed with the IPO authors).
- **Metrics per step** (TRL's names in brackets): loss; rewards/chosen, rewards/rejected = β·log-ratio
  [rewards/chosen, rewards/rejected]; rewards/margin [rewards/margins]; rewards/accuracy = share of pairs
  whose chosen reward is higher, ties (|margin| < TIE·β) counting half, so an untrained policy scores 50%
  (TRL's rewards/accuracies counts ties as wrong: 0% at step 0, then float noise decides); logps/chosen,
  logps/rejected; and kl, an estimate of the KL between policy and reference in nats per token:
  Schulman's k3 estimator mean(e^r - 1 - r) over both answers, r = (log π(y|x) - log π_ref(y|x)) / |y| —
  never negative, and unbiased for KL(π_ref‖π) when the answers are samples of the reference, which the
  SFT parent (trained on such answers) approximately makes them. It is zero while π = π_ref and grows as
  the policy drifts; DPO lowers both answers' likelihoods, so the plain mean log-ratio (negative) is no KL.
- **Many processes** (torchrun; DDP or FSDP2): the reference pass is dealt round-robin to the ranks and
  all-gathered (rank 0 writes the cache); metrics are all-reduced; evaluation padding batches (which keep
  FSDP's collective forwards in step) are not counted. Under FSDP2 the frozen reference is sharded too.
  N processes reproduce 1 process (tested).
- **Throughput**: ``tokens_processed`` in each step record counts the real tokens the policy ran (prompt once
  + chosen + rejected, no padding); the loop's ``tokens_per_s`` and ``mfu`` use it.
- **Malformed pairs** (empty prompt/answer, identical answers, ids outside the vocabulary, longer than the
  model's context) are counted per reason, skipped, and reported in the run's ``dpo_report.json``; the
  run never crashes on them. Reading and rendering raw files is `dhad data prefs` (dhad.data.prefs).

This module is the objective (config, losses, metrics, reference handling, the speedrun stage); pairs,
batch layouts and log-probabilities under a model are dhad.train.preference.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dhad.lora import lora_disabled, lora_layers
from dhad.train import distributed as D
from dhad.train.preference import (  # noqa: F401 - Pair, load_pairs: the pair API, importable from here
    Pair,
    PairReport,
    PairView,
    _prefs_report,
    _Prefix,
    cached_reference_logps,
    collate,
    compute_logps,
    init_fingerprint,
    load_pairs,
    processed_tokens,
    sequence_logps,
    validate_prefs,
)

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("auto", "precomputed", "frozen")
# Log-ratio margins (in nats, before β) smaller than this are ties: a policy equal to its reference gives
# margins of float noise only (~1e-6 nats in fp32: the reference pass batches pairs differently).
TIE = 1e-3
REPORT = "dpo_report.json"


class DPOError(ValueError):
    """A DPO setting or data set that cannot work (names the field / file)."""


@dataclass
class DPOConfig:
    """The `dpo:` block of a recipe."""
    beta: float = 0.1                 # DPO paper's β (Rafailov et al. 2023, sec. 6); NOT from any model card
    loss: str = "sigmoid"             # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0      # conservative DPO ε; 0 = the paper's loss
    reference: str = "auto"           # auto | precomputed | frozen  (auto: precomputed on CPU, frozen on GPU)
    share_prompt: bool = True         # prompt once per pair (token tree) vs TRL's [prompt+chosen; prompt+rejected]
    max_length: int | None = None     # drop pairs longer than this (default: the model's block_size)
    ref_batch_size: int = 16          # pairs per forward when precomputing reference log-probs
    eval_pairs: int | None = 256      # held-out pairs for preference accuracy (None = all)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise DPOError(f"dpo.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.reference not in REFERENCES:
            raise DPOError(f"dpo.reference must be one of {REFERENCES}, got {self.reference!r}")
        if not self.beta > 0:
            raise DPOError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DPOError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise DPOError("dpo.label_smoothing applies to the sigmoid loss only")

    @classmethod
    def from_dict(cls, d: dict | None) -> DPOConfig:
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DPOError(f"unknown dpo settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def resolved_reference(self, device) -> str:
        if self.reference != "auto":
            return self.reference
        return "precomputed" if torch.device(device).type == "cpu" else "frozen"


# ---------------------------------------------------------------------------------------------
# Loss

@dataclass
class PreferenceOutput:
    losses: torch.Tensor            # [B] per pair
    chosen_rewards: torch.Tensor    # [B] β·(log π - log π_ref)(y_w), detached
    rejected_rewards: torch.Tensor  # [B]
    chosen_logps: torch.Tensor      # [B] log π(y_w|x), detached
    rejected_logps: torch.Tensor
    n_chosen: torch.Tensor | None = None    # [B] answer token counts (for per-token metrics)
    n_rejected: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
                    label_smoothing: float = 0.0, n_chosen: torch.Tensor | None = None,
                    n_rejected: torch.Tensor | None = None) -> PreferenceOutput:
    """Per-pair DPO / IPO loss from summed answer log-probs of policy and reference."""
    chosen_lr = chosen_logps - ref_chosen_logps.to(chosen_logps)
    rejected_lr = rejected_logps - ref_rejected_logps.to(rejected_logps)
    if loss == "sigmoid":
        z = beta * (chosen_lr - rejected_lr)
        losses = -F.logsigmoid(z)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        if n_chosen is None or n_rejected is None:
            raise DPOError("the ipo loss needs the answers' token counts")
        d = chosen_lr / n_chosen.clamp(min=1).to(chosen_lr) - rejected_lr / n_rejected.clamp(min=1).to(rejected_lr)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise DPOError(f"unknown loss {loss!r}; use one of {LOSSES}")
    return PreferenceOutput(losses, beta * chosen_lr.detach(), beta * rejected_lr.detach(),
                            chosen_logps.detach(), rejected_logps.detach(), n_chosen, n_rejected)


def kl_estimate(out: PreferenceOutput, beta: float) -> torch.Tensor:
    """[B] per-pair k3 KL estimate in nats per token, averaged over the pair's two answers."""
    nc = out.n_chosen.to(out.chosen_rewards).clamp(min=1) if out.n_chosen is not None else 1.0
    nr = out.n_rejected.to(out.rejected_rewards).clamp(min=1) if out.n_rejected is not None else 1.0
    return (kl_k3(out.chosen_rewards / beta / nc) + kl_k3(out.rejected_rewards / beta / nr)) / 2


def kl_k3(logratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 KL estimator per sample: e^r - 1 - r >= 0 (r = log π/π_ref of a reference sample)."""
    r = logratio.double()
    return torch.expm1(r) - r


def pair_correct(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """1 where the chosen answer has the higher implicit reward, 0 where lower, 0.5 on a tie."""
    m = (chosen_rewards - rejected_rewards).double()
    tol = TIE * beta
    return (m > tol).double() + 0.5 * (m.abs() <= tol).double()


def step_metrics(out: PreferenceOutput, beta: float) -> dict[str, float]:
    """The per-step numbers (means over the pairs of the batch)."""
    cr, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
    return {
        "loss": float(out.losses.detach().float().mean()),
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/margin": float((cr - rr).mean()),
        "rewards/accuracy": float(pair_correct(cr, rr, beta).mean()),
        "logps/chosen": float(out.chosen_logps.float().mean()),
        "logps/rejected": float(out.rejected_logps.float().mean()),
        "kl": float(kl_estimate(out, beta).mean()),
    }


# ---------------------------------------------------------------------------------------------
# The `dpo` recipe type: loss + batch source for the shared training loop

_STATS = ("n", "loss", "chosen_reward", "rejected_reward", "correct", "chosen_logp", "rejected_logp", "kl",
          "likelihood_correct", "tokens")


def _objective_base():
    from dhad.train.objectives import Objective, register_objective
    return Objective, register_objective


_Objective, _register = _objective_base()


@_register("dpo")
class DPOObjective(_Objective):
    """Recipe type `dpo`: batches are preference pairs from prefs shards, the loss is DPO/IPO.

    The loop (dhad.train.loop) owns everything else. Order of calls it makes:
      open_source(name, dir, split, seed, shuffle)   per data source: a resumable pair stream
      setup(model, recipe, device, run_dir=..)       once, while `model` still holds the initial (SFT)
                                                     weights — also on resume, before the checkpoint is
                                                     loaded: this is where the reference is fixed
      collate(pairs, device) / count(batch) / loss(model, batch) -> (sum of pair losses, n pairs)
      val_items(...)                                 held-out pairs; loss() under no_grad counts them as eval
      metrics() / eval_metrics()                     reward metrics since the previous call (pair-weighted)
    Recipe `objective:` keys are the DPOConfig fields (beta, loss, label_smoothing, reference, ...).
    """

    expected_kind = "prefs"

    def __init__(self, **options):
        self.cfg = DPOConfig.from_dict(options)
        self.views: dict[tuple[str, str], PairView] = {}     # (split, source) -> valid pairs
        self.paths: dict[str, Any] = {}                       # source -> shard dir
        self.reports: dict[str, PairReport] = {}              # "split/source" -> what was skipped
        self.tables: dict[tuple[str, str], torch.Tensor] = {}  # (split, source) -> [n_source, 2] ref log-probs
        self.ref_model = None
        self.ref_adapters_off = False  # LoRA: the reference is the policy with its adapters switched off
        self.reference = None
        self.share_prompt = self.cfg.share_prompt  # the layout of training batches (see setup())
        self.progress = True                      # the loop sets this from its own `progress`
        self.device = torch.device("cpu")
        self.autocast_dtype = None
        self.pad_id = 0
        self.vocab_size = None
        self.run_dir = None
        self._acc = {"train": torch.zeros(len(_STATS), dtype=torch.float64),
                     "eval": torch.zeros(len(_STATS), dtype=torch.float64)}

    # -- data -----------------------------------------------------------------------------------
    def _view(self, name: str, path, split: str) -> PairView:
        from dhad.data.shards import PrefsSet
        key = (split, name)
        if key not in self.views:
            ps = PrefsSet(self.open_shards(name, path, split))
            vocab = self.vocab_size or int(ps.meta.get("vocab_size") or 2**31)
            self.pad_id = int(ps.meta.get("pad_token_id") or 0)
            rep = PairReport(prepared=_prefs_report(path))
            view, rep = validate_prefs(ps, vocab, name, split, rep)
            self.views[key], self.reports[f"{split}/{name}"] = view, rep
            self.paths[name] = path
        return self.views[key]

    def open_source(self, name, path, split, seed, shuffle):
        from dhad.train.loader import IndexStream
        view = self._view(name, path, split)
        if not len(view):
            raise DPOError(f"data.sources.{name}: no usable preference pairs in {path}/{split} "
                           f"({self.reports[f'{split}/{name}'].summary()})")
        stream = IndexStream(len(view), view.__getitem__, name, seed, shuffle, tokens_per_item=1, kind="prefs")
        view.stream = stream  # setup() may drop over-long pairs: the stream's length follows
        return stream

    def val_items(self, name, path, split, seq_len, n):
        view = self._view(name, path, split)
        view.restrict(self._max_length(seq_len), self.reports[f"{split}/{name}"])
        return [view[j] for j in range(min(n, len(view)))]

    def _max_length(self, seq_len: int | None) -> int | None:
        lims = [x for x in (seq_len, self.block_size if hasattr(self, "block_size") else None) if x]
        return min(lims) if lims else None

    # -- reference ------------------------------------------------------------------------------
    def setup(self, model, recipe, device, run_dir=None, **_) -> None:
        inner = D.unwrap(model)
        self.device = torch.device(device)
        self.block_size = inner.config.block_size
        self.vocab_size = inner.config.vocab_size
        self.autocast_dtype = torch.bfloat16 if getattr(recipe, "precision", "fp32") == "bf16" else None
        self.reference = self.cfg.resolved_reference(self.device)
        # ALiBi's train_seq_len scaling depends on each sequence's length, which the shared prompt of a
        # tree does not have (it belongs to two): such models run the concatenated layout.
        scaled = (inner.config.alibi_scaling or {}).get("train_seq_len") is not None
        self.share_prompt = self.cfg.share_prompt and not scaled
        self.run_dir = Path(run_dir or recipe.out_dir) if (run_dir or getattr(recipe, "out_dir", None)) else None
        max_len = self._max_length(recipe.batch.seq_len)
        for (split, name), view in self.views.items():
            view.restrict(max_len, self.reports[f"{split}/{name}"])
            if hasattr(view, "stream"):
                if not len(view):
                    raise DPOError(f"data.sources.{name}: every pair is longer than {max_len} tokens")
                view.stream.n = len(view)
        # Held-out pairs: the same ones the loop will ask for (val_items takes the first n).
        n_val = 0
        if getattr(recipe, "eval_batches", 0):
            n_val = max(self.cfg.eval_pairs or 0, recipe.eval_batches * recipe.batch.micro_batch_size)
        val_split = getattr(recipe.data, "val_split", "val")
        if n_val:
            for name, path in list(self.paths.items()):
                if (Path(path) / val_split / "index.json").is_file():
                    self._view(name, path, val_split).restrict(max_len, self.reports[f"{val_split}/{name}"])
        key = init_fingerprint(recipe.model.init_from if getattr(recipe.model, "init_from", None) else inner)
        kw = dict(batch_size=self.cfg.ref_batch_size, share_prompt=self.share_prompt, device=self.device,
                  autocast_dtype=self.autocast_dtype, progress=self.progress)
        info = {}
        import time
        t0 = time.perf_counter()
        for (split, name), view in self.views.items():
            is_train = hasattr(view, "stream")
            if self.reference != "precomputed":
                break  # frozen: the reference copy scores every batch, train and held-out alike
            if not is_train:
                if not n_val:
                    continue
                view = _Prefix(view, n_val)
            path = self.run_dir / "ref_logps" / f"{split}-{name}.safetensors" if self.run_dir else None
            with lora_disabled(inner):  # LoRA: the base alone (a no-op for a model without adapters)
                if path is not None:
                    t, hit = cached_reference_logps(inner, view, path, key, desc=f"reference log-probs {split}/{name}",
                                                    **kw)
                else:
                    t, hit = compute_logps(inner, view, desc=f"reference log-probs {split}/{name}", **kw), False
            keep = view.view.keep[:view.n] if isinstance(view, _Prefix) else view.keep
            table = torch.full((len(view.ps), 2), float("nan"))
            table[torch.tensor(keep, dtype=torch.long)] = t
            self.tables[(split, name)] = table
            info[f"{split}/{name}"] = {"pairs": len(view), "cache": str(path) if path else None, "reused": hit}
        if self.reference == "frozen" and lora_layers(inner):
            self.ref_adapters_off = True  # no second copy: the base is inside the policy
        elif self.reference == "frozen":
            import copy
            self.ref_model = copy.deepcopy(inner)
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            self.ref_model.eval()
            env = D.current_env(self.device)
            if getattr(recipe, "distributed", "none") == "fsdp" and env.distributed:
                # shard the frozen copy like the policy: a whole second model per GPU would undo FSDP's saving.
                # Its forwards are collective, which holds: every rank runs the same micro batches (the
                # loop pads evaluation rounds with lockstep-only batches).
                D.wrap_model(self.ref_model, "fsdp", env, getattr(recipe, "precision", "fp32"))
        self._write_report({"reference": {"mode": self.reference, "tables": info,
                                          "seconds": round(time.perf_counter() - t0, 3)},
                            "layout": "tree" if self.share_prompt else "concatenated"})

    def _write_report(self, extra: dict) -> None:
        rep = {"config": asdict(self.cfg), **extra,
               "pairs": {k: r.to_dict() for k, r in self.reports.items()}}
        self.summary = rep
        is_main = D.current_env(self.device).is_main
        if self.run_dir is not None and is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / (REPORT + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(rep, indent=2, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.run_dir / REPORT)
        if is_main:
            for k, r in self.reports.items():
                if r.skipped:
                    print(f"dpo: {k}: {r.summary()}", flush=True)

    # -- batches and loss -----------------------------------------------------------------------
    def collate(self, items, device) -> dict:
        b = collate(items, self.share_prompt, self.pad_id, device)
        b["n_tokens"] = processed_tokens(items, self.share_prompt)  # a host int: no device sync to count
        if self.ref_model is None and self.tables:
            ref = []
            for p in items:
                t = self.tables.get((p.split, p.source))
                if t is None or torch.isnan(t[p.index, 0]):
                    raise DPOError(f"no reference log-probs for {p.source}/{p.split} pair {p.index} "
                                   "(setup() precomputes the pairs the run uses)")
                ref.append(t[p.index])
            b["ref"] = torch.stack(ref).to(device)
        return b

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(batch["index"].numel())

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        lp = sequence_logps(model, batch)
        B = lp.shape[0] // 2
        if "ref" in batch:
            rc, rr = batch["ref"][:, 0], batch["ref"][:, 1]
        elif self.ref_adapters_off:
            inner = D.unwrap(model)
            with torch.no_grad(), lora_disabled(inner):
                r = sequence_logps(inner, batch).float()
            rc, rr = r[:B], r[B:]
        else:
            if self.ref_model is None:
                raise DPOError("DPO objective used before setup()")
            with torch.no_grad():
                r = sequence_logps(self.ref_model, batch).float()
            rc, rr = r[:B], r[B:]
        out = preference_loss(lp[:B], lp[B:], rc, rr, self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing,
                              batch["n_chosen"], batch["n_rejected"])
        if not batch.get("lockstep_only"):  # a padding batch the loop runs only to keep ranks in step
            self._accumulate("train" if torch.is_grad_enabled() else "eval", out, batch.get("n_tokens", 0))
        return out.losses.sum(), torch.tensor(B, device=lp.device)

    def _accumulate(self, mode: str, out: PreferenceOutput, tokens: int = 0) -> None:
        cr, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
        kl = kl_estimate(out, self.cfg.beta).double()
        v = torch.stack([torch.tensor(float(cr.numel()), dtype=torch.float64), out.losses.detach().double().sum(),
                         cr.sum(), rr.sum(), pair_correct(cr, rr, self.cfg.beta).sum(), out.chosen_logps.double().sum(),
                         out.rejected_logps.double().sum(), kl.sum(),
                         (out.chosen_logps > out.rejected_logps).double().sum(),
                         torch.tensor(float(tokens), dtype=torch.float64)]).cpu()
        self._acc[mode] += v

    def _drain(self, mode: str) -> dict:
        acc = D.all_reduce_sum(self._acc[mode].clone(), D.current_env(self.device))
        self._acc[mode].zero_()
        s = dict(zip(_STATS, acc.tolist()))
        n = s["n"]
        if not n:
            return {}
        pre = "" if mode == "train" else "eval/"
        # tokens_processed: real tokens the policy ran since the previous record, all processes, no padding
        # (shared-prompt layout: prompt once + chosen + rejected; concatenated: the prompt twice). The
        # loop's tokens_per_s and mfu use it instead of its plan's pairs x seq_len.
        tok = {"tokens_processed": int(s["tokens"])} if mode == "train" else {}
        return {**tok, f"{pre}rewards/chosen": s["chosen_reward"] / n, f"{pre}rewards/rejected": s["rejected_reward"] / n,
                f"{pre}rewards/margin": (s["chosen_reward"] - s["rejected_reward"]) / n,
                f"{pre}rewards/accuracy": s["correct"] / n, f"{pre}logps/chosen": s["chosen_logp"] / n,
                f"{pre}logps/rejected": s["rejected_logp"] / n, f"{pre}kl": s["kl"] / n,
                **({f"{pre}loss": s["loss"] / n, f"{pre}likelihood_accuracy": s["likelihood_correct"] / n,
                    f"{pre}pairs": int(n)} if mode == "eval" else {})}

    def metrics(self, batch=None, extras=None) -> dict:
        """Training reward metrics since the previous call (call once per logged step, on every rank)."""
        return self._drain("train")

    def eval_metrics(self) -> dict:
        """Held-out metrics of the evaluation that just ran: eval/rewards/accuracy is the held-out
        preference accuracy (ties, as before any training, count half: 50% is chance)."""
        return self._drain("eval")


# ---------------------------------------------------------------------------------------------
# The optional DPO stage of the speedrun

def run_dpo_stage(sft_model_dir, prefs_dir, out_dir, *, steps: int | None = None, epochs: float = 1.0,
                  max_steps: int = 2000, batch_pairs: int = 32, micro_batch: int = 16, lr: float = 1e-3,
                  beta: float = 0.1, loss: str = "sigmoid", reference: str = "auto", seq_len: int | None = None,
                  precision: str = "fp32", eval_every: int = 0, eval_batches: int = 8, seed: int = 1234,
                  progress: bool = True, resume: bool = False, peak_flops: float | None = None) -> dict:
    """DPO after SFT as one call (the speedrun's optional stage): `sft_model_dir` (a dhad model dir with its
    tokenizer) + `prefs_dir` (`dhad data prefs` output with train/validation splits) -> `out_dir/model`.

    Budget: `steps` optimizer steps, or by default `epochs` passes over the training pairs at
    `batch_pairs` pairs per step, capped at `max_steps`. lr 1e-3 suits the tiny/small presets; a 7B model
    wants ~5e-7 (see recipes/allam-style-dpo.yaml). Returns the run summary: steps, final training
    reward metrics, held-out preference accuracy (start and end) and the model directory."""
    from dhad.data.shards import PrefsSet
    from dhad.train.loop import train
    from dhad.train.recipe import parse_recipe

    prefs_dir, out_dir = Path(prefs_dir), Path(out_dir)
    ps = PrefsSet.open(prefs_dir, "train")
    if steps is None:
        steps = max(1, min(max_steps, math.ceil(epochs * len(ps) / batch_pairs)))
    if seq_len is None:
        from dhad.config import Config
        block = Config.from_file(Path(sft_model_dir)).block_size
        L = ps.lengths()
        longest = int((L[:, 0] + L[:, 1:].max(1)).max()) if len(L) else block
        seq_len = min(block, longest)
    has_val = (prefs_dir / "validation" / "index.json").is_file()
    recipe = parse_recipe({
        "type": "dpo", "name": "dpo", "seed": seed, "model": {"init_from": str(sft_model_dir)},
        "data": {"sources": {"prefs": str(prefs_dir)}, "val_split": "validation"},
        "objective": {"beta": beta, "loss": loss, "reference": reference},
        "optimizer": {"lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.0},
        "schedule": {"warmup_steps": max(1, steps // 10), "total_steps": steps, "min_lr": lr / 10},
        "batch": {"global_batch_size": batch_pairs, "micro_batch_size": min(micro_batch, batch_pairs),
                  "seq_len": seq_len},
        "precision": precision, "eval_every": eval_every if has_val else 0,
        "eval_batches": eval_batches if has_val else 0, "checkpoint_every": 0, "log_every": 1,
        "peak_flops": peak_flops,
    }, source="run_dpo_stage")
    res = train(recipe, run_dir=out_dir, progress=progress, resume=resume)
    from dhad.train.metrics import read_metrics
    recs = read_metrics(out_dir / "metrics.jsonl")
    steps_logged = [r for r in recs if r.get("event") == "step"]
    evals = [r for r in recs if r.get("event") == "eval"]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl")
    out = {"model_dir": str(res.model_dir) if res.model_dir else None, "steps": res.step,
           "interrupted": res.interrupted, "final": {k: steps_logged[-1].get(k) for k in keys} if steps_logged else {},
           "heldout_accuracy": [(e["step"], e.get("eval/rewards/accuracy")) for e in evals],
           "report": str(out_dir / REPORT)}
    return out
