"""Vocabulary adaptation of a trained model (the Jais-adapted recipe).

Jais-adapted extends Llama-2's 32,000-token vocabulary with 32,000 Arabic tokens of the Jais
vocabulary, then (model card):
  1. initialises each new embedding by a linear map, learned on the tokens both vocabularies share,
     from the donor's (Jais) embedding space to the base's (Llama-2) embedding space;
  2. stage 1 trains the embeddings with the backbone frozen; stage 2 trains everything.

Design choices
- Tokens are matched across vocabularies by the *bytes* they stand for (`Tokenizer.token_bytes`),
  so a SentencePiece `▁the` and a byte-level BPE `Ġthe` are the same token; special/control tokens
  never match.
- The map is fitted in closed form (least squares with a bias, optional ridge), in float64, on a
  random 90% of the shared tokens; R² and mean cosine on the other 10% are reported so a bad fit is
  visible before any training; the map applied to the new tokens is then refitted on all of them.
- Input embeddings and LM head are handled separately when the base is untied (Llama): each gets its
  own map (from the donor's head, or its tied embedding when the donor is tied, as Jais is).
- Without a donor: mean of the old rows (every new token starts as the "average token"), or mean +
  covariance sampling (Hewitt 2021) so new rows differ from each other.
- The model is resized in place; old rows are copied bit for bit; the result is saved as a normal
  dhad/HF model directory with the extended tokenizer.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dhad.tokenizer import Tokenizer


class AdaptError(ValueError):
    """A user-facing adaptation problem (mismatched tokenizers, no shared tokens, ...)."""


# ----------------------------------------------------------------------------------------------
# the linear map


@dataclass
class LinearMap:
    """y = x @ weight + bias, from the donor's embedding space (d_donor) to the base's (d_base)."""

    weight: torch.Tensor  # [d_donor, d_base]
    bias: torch.Tensor  # [d_base]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight + self.bias


def fit_linear_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0, bias: bool = True) -> LinearMap:
    """Closed-form least squares `min ||x W + b - y||² + ridge ||W||²` (float64; the bias is not penalised)."""
    if x.shape[0] != y.shape[0]:
        raise AdaptError(f"fit needs paired rows: {x.shape[0]} donor vs {y.shape[0]} base")
    if x.shape[0] < 2:
        raise AdaptError(f"fit needs at least 2 shared tokens, got {x.shape[0]}")
    x = x.detach().double()
    y = y.detach().double()
    mx = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=x.dtype)
    my = y.mean(0) if bias else torch.zeros(y.shape[1], dtype=y.dtype)
    xc, yc = x - mx, y - my
    if ridge > 0:
        a = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(a, xc.T @ yc)
    else:
        # gelsd = SVD-based, minimum-norm solution when there are fewer shared tokens than dimensions
        w = torch.linalg.lstsq(xc, yc, driver="gelsd").solution
    return LinearMap(w, my - mx @ w)


def fit_quality(m: LinearMap, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(R², mean cosine) of the map's predictions of `y` from `x`. R² = 1 - SS_res / SS_tot, over all
    coordinates, SS_tot around y's column means."""
    y = y.detach().double()
    pred = m(x.detach().double())
    ss_res = ((y - pred) ** 2).sum()
    ss_tot = ((y - y.mean(0)) ** 2).sum()
    r2 = 1.0 - float(ss_res / ss_tot) if ss_tot > 0 else float("nan")
    cos = float(torch.nn.functional.cosine_similarity(pred, y, dim=-1).mean())
    return r2, cos


# ----------------------------------------------------------------------------------------------
# token correspondences


def token_pairs(a: Tokenizer, b: Tokenizer, a_ids=None) -> list[tuple[int, int]]:
    """(id in a, id in b) for tokens of `a` (restricted to `a_ids`) that stand for the same bytes in `b`."""
    index: dict[bytes, int] = {}
    for i in range(b.vocab_size):
        t = b.token_bytes(i)
        if t is not None and t not in index:
            index[t] = i
    out = []
    for i in (range(a.vocab_size) if a_ids is None else a_ids):
        t = a.token_bytes(i)
        if t is not None and t in index:
            out.append((i, index[t]))
    return out


def check_extends(base_tok: Tokenizer, ext_tok: Tokenizer) -> None:
    """The extended tokenizer must keep every base id meaning the same token."""
    if ext_tok.vocab_size < base_tok.vocab_size:
        raise AdaptError(f"the extended tokenizer ({ext_tok.vocab_size} tokens) is smaller than the base's "
                         f"({base_tok.vocab_size}): not an extension")
    for i in range(base_tok.vocab_size):
        if base_tok.id_to_token(i) != ext_tok.id_to_token(i):
            raise AdaptError(f"the extended tokenizer is not an extension of the base's: id {i} is "
                             f"{base_tok.id_to_token(i)!r} in the base but {ext_tok.id_to_token(i)!r} in the extended one")


# ----------------------------------------------------------------------------------------------
# resize + init


@dataclass
class MatrixReport:
    name: str  # "wte" or "lm_head"
    n_shared: int = 0
    n_fit: int = 0
    n_heldout: int = 0
    heldout_r2: float | None = None
    heldout_cosine: float | None = None
    train_r2: float | None = None


@dataclass
class InitReport:
    method: str  # projection | mean | mean_cov
    old_vocab: int
    new_vocab: int
    n_new: int
    n_new_from_donor: int = 0  # new rows initialised through the map (the rest: mean)
    ridge: float = 0.0
    center_head: bool = False
    matrices: list[MatrixReport] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.method} init: vocab {self.old_vocab} -> {self.new_vocab} ({self.n_new} new rows"
                 + (f", {self.n_new_from_donor} from the donor" if self.method == "projection" else "") + ")"]
        for m in self.matrices:
            if m.heldout_r2 is not None:
                lines.append(f"  {m.name}: fit on {m.n_fit} shared tokens, held-out {m.n_heldout}: "
                             f"R² {m.heldout_r2:.3f}, cosine {m.heldout_cosine:.3f} (train R² {m.train_r2:.3f})")
        return "\n".join(lines)


def resize_token_embeddings(model: nn.Module, new_vocab: int) -> nn.Module:
    """Grow (or keep) `wte` and `lm_head` to `new_vocab` rows in place; old rows copied exactly,
    new rows zero (callers initialise them). Tied models stay tied."""
    c = model.config
    old = model.wte.weight
    V, E = old.shape
    if new_vocab < V:
        raise AdaptError(f"cannot shrink the vocabulary from {V} to {new_vocab}")
    wte = nn.Embedding(new_vocab, E, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        wte.weight.zero_()
        wte.weight[:V] = old
    head_old = model.lm_head.weight
    model.wte = wte
    if c.tie_embeddings:
        model.lm_head = nn.Linear(E, new_vocab, bias=False, device=old.device, dtype=old.dtype)
        model.lm_head.weight = model.wte.weight
    else:
        head = nn.Linear(E, new_vocab, bias=False, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.weight[: head_old.shape[0]] = head_old
        model.lm_head = head
    model.config = c.replace(vocab_size=new_vocab) if hasattr(c, "replace") else c
    return model


def _mean_cov_rows(old: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    x = old.detach().double()
    mu = x.mean(0)
    cov = torch.cov(x.T) + 1e-8 * torch.eye(x.shape[1], dtype=x.dtype)
    # Hewitt (2021): sample new rows from N(mu, cov) of the old rows
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return dist.sample((n,))
    finally:
        torch.random.set_rng_state(g_state)


def _project_rows(name: str, base_w: torch.Tensor, donor_w: torch.Tensor, shared: list[tuple[int, int]],
                  new: list[tuple[int, int]], ridge: float, holdout: float, seed: int) -> tuple[MatrixReport, dict[int, torch.Tensor]]:
    rep = MatrixReport(name, n_shared=len(shared))
    ids_b = torch.tensor([i for i, _ in shared])
    ids_d = torch.tensor([j for _, j in shared])
    x_all, y_all = donor_w[ids_d], base_w[ids_b]
    n = len(shared)
    n_hold = max(1, round(holdout * n)) if holdout > 0 and n >= 4 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold, fit = perm[:n_hold], perm[n_hold:]
    m = fit_linear_map(x_all[fit], y_all[fit], ridge)
    rep.n_fit, rep.n_heldout = len(fit), n_hold
    rep.train_r2 = fit_quality(m, x_all[fit], y_all[fit])[0]
    if n_hold:
        rep.heldout_r2, rep.heldout_cosine = fit_quality(m, x_all[hold], y_all[hold])
        m = fit_linear_map(x_all, y_all, ridge)  # the map we apply uses every shared token
    rows = {}
    if new:
        pred = m(donor_w[torch.tensor([j for _, j in new])])
        rows = {i: pred[k] for k, (i, _) in enumerate(new)}
    return rep, rows


@torch.no_grad()
def extend_model(model: nn.Module, base_tok: Tokenizer, ext_tok: Tokenizer, donor: nn.Module | None = None,
                 donor_tok: Tokenizer | None = None, *, method: str = "auto", ridge: float = 0.0,
                 holdout: float = 0.1, seed: int = 0, pad_to_multiple_of: int = 1,
                 center_head: bool = True) -> InitReport:
    """Resize `model` (in place) to `ext_tok`'s vocabulary and initialise the new rows.

    method: "projection" (needs donor + donor_tok), "mean", "mean_cov", or "auto" (projection when a
    donor is given, else mean). New rows are ids >= base_tok.vocab_size. `center_head`: shift the
    projected output-head rows (the tied matrix when tied) so their mean is the old rows' mean.
    """
    if method == "auto":
        method = "projection" if donor is not None else "mean"
    if method not in ("projection", "mean", "mean_cov"):
        raise AdaptError(f"unknown init method {method!r}: choose projection, mean, mean_cov or auto")
    if method == "projection" and (donor is None or donor_tok is None):
        raise AdaptError("projection init needs a donor model and its tokenizer")
    check_extends(base_tok, ext_tok)
    n_old_tok = base_tok.vocab_size
    old_vocab = model.config.vocab_size
    if n_old_tok > old_vocab:
        raise AdaptError(f"the base tokenizer has {n_old_tok} tokens but the base model only {old_vocab} rows")
    new_vocab = max(old_vocab, ext_tok.vocab_size)
    if pad_to_multiple_of > 1:
        new_vocab = int(math.ceil(new_vocab / pad_to_multiple_of) * pad_to_multiple_of)
    new_ids = list(range(n_old_tok, ext_tok.vocab_size))
    if not new_ids:
        raise AdaptError("the extended tokenizer adds no tokens to the base's")
    tied = model.config.tie_embeddings
    # statistics of the trained rows (the base tokenizer's ids, not padding rows)
    old_wte = model.wte.weight[:n_old_tok].detach().clone()
    old_head = None if tied else model.lm_head.weight[:n_old_tok].detach().clone()
    resize_token_embeddings(model, new_vocab)
    rep = InitReport(method, old_vocab, new_vocab, len(new_ids), ridge=ridge,
                     center_head=center_head and method == "projection")
    targets = [("wte", model.wte.weight, old_wte)] + ([] if tied else [("lm_head", model.lm_head.weight, old_head)])
    # rows past the tokenizer (padding rows added by pad_to_multiple_of) get the mean as well
    pad_ids = list(range(max(old_vocab, ext_tok.vocab_size), new_vocab))

    if method == "projection":
        shared = token_pairs(ext_tok, donor_tok, range(n_old_tok))
        if not shared:
            raise AdaptError("the donor tokenizer shares no tokens with the base vocabulary: there is nothing to "
                             "fit the embedding map on (use --method mean, or a donor with overlapping tokens)")
        new_pairs = token_pairs(ext_tok, donor_tok, new_ids)
        rep.n_new_from_donor = len(new_pairs)
        if donor.config.vocab_size < donor_tok.vocab_size:
            raise AdaptError(f"donor model has {donor.config.vocab_size} rows but its tokenizer {donor_tok.vocab_size} tokens")
        donor_wte = donor.wte.weight.detach()
        donor_head = donor_wte if donor.config.tie_embeddings else donor.lm_head.weight.detach()
        from_donor = {i for i, _ in new_pairs}
        for name, w, old in targets:
            src = donor_wte if name == "wte" else donor_head
            mrep, rows = _project_rows(name, old, src, shared, new_pairs, ridge, holdout, seed)
            rep.matrices.append(mrep)
            is_head = name == "lm_head" or tied
            if rows and center_head and is_head:
                # Keep the donor's relative structure among the new tokens, but give them as a group the
                # base's average logit level: the donor's "this token is another language" offset is
                # something the base's hidden states cannot condition on yet (measured in
                # tests/test_adapt.py: lower Arabic loss right after extension than without centering).
                shift = old.double().mean(0) - torch.stack(list(rows.values())).mean(0)
                rows = {i: v + shift for i, v in rows.items()}
            for i, v in rows.items():
                w[i] = v.to(w.dtype)
            mean = old.double().mean(0).to(w.dtype)
            for i in new_ids + pad_ids:
                if i not in from_donor:
                    w[i] = mean
    else:
        for name, w, old in targets:
            if method == "mean":
                w[new_ids + pad_ids] = old.double().mean(0).to(w.dtype)
            else:
                w[new_ids + pad_ids] = _mean_cov_rows(old, len(new_ids) + len(pad_ids), seed).to(w.dtype)
            rep.matrices.append(MatrixReport(name))
    return rep


def adapt_init(base: str | Path, tokenizer: str | Path, out: str | Path, donor: str | Path | None = None, *,
               method: str = "auto", ridge: float = 0.0, holdout: float = 0.1, seed: int = 0,
               pad_to_multiple_of: int = 1, base_tokenizer: str | Path | None = None, dtype=None,
               center_head: bool = True) -> InitReport:
    """`dhad adapt init`: read a base model dir (+ its tokenizer), an extended tokenizer and optionally a
    donor model dir; write the resized, initialised model with the extended tokenizer to `out`."""
    import dhad
    from dhad.tokenizer import TokenizerError, load_tokenizer

    def _tok(p, what):
        try:
            return load_tokenizer(p)
        except TokenizerError as e:
            raise AdaptError(f"{what}: {e}") from None

    def _model(p, what):
        p = Path(p)
        if not (p / "config.json").is_file():
            raise AdaptError(f"{what}: {p} is not a model directory (no config.json)")
        return dhad.load_model(p, dtype="float32")

    model = _model(base, "base model")
    base_tok = _tok(base_tokenizer or base, "base tokenizer")
    ext_tok = _tok(tokenizer, "extended tokenizer")
    dmodel = dtok = None
    if donor is not None:
        dmodel = _model(donor, "donor model")
        dtok = _tok(donor, "donor tokenizer")
    rep = extend_model(model, base_tok, ext_tok, dmodel, dtok, method=method, ridge=ridge, holdout=holdout,
                       seed=seed, pad_to_multiple_of=pad_to_multiple_of, center_head=center_head)
    out = Path(out)
    dhad.save_model(model, out, tokenizer=ext_tok, dtype=dtype)
    from dhad.utils import atomic_write_bytes

    atomic_write_bytes(out / "adapt_report.json", (json.dumps(rep.as_dict(), indent=2) + "\n").encode())
    return rep


# ----------------------------------------------------------------------------------------------
# freezing for the two-stage recipe


def embedding_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The input embedding and LM head parameters (one entry when tied)."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if name.startswith(("wte.", "lm_head.")) and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@dataclass
class FreezeState:
    """What `freeze_for_stage` did; `remove()` undoes the gradient-mask hooks."""

    stage: int
    trainable: list[str]
    row_mask_ids: list[int] | None = None
    handles: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def freeze_for_stage(model: nn.Module, stage: int, new_token_ids=None) -> FreezeState:
    """Stage 1: only embeddings + LM head train (backbone frozen); with `new_token_ids`, a gradient
    hook zeroes every other row so only the new tokens move. Stage 2: everything trains.

    Rows masked this way stay exactly unchanged under SGD or Adam(W) *without weight decay* on those
    parameters (a zero gradient gives a zero Adam update; weight decay would still shrink them):
    build the optimizer with `stage_param_groups`.
    """
    prev = getattr(model, "_dhad_freeze", None)
    if prev is not None:
        prev.remove()
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    emb = embedding_params(model)
    emb_ids = {id(p) for _, p in emb}
    state = FreezeState(stage, [])
    for name, p in model.named_parameters():
        p.requires_grad_(stage == 2 or id(p) in emb_ids)
        if p.requires_grad:
            state.trainable.append(name)
    if stage == 1 and new_token_ids is not None:
        ids = sorted({int(i) for i in new_token_ids})
        if not ids:
            raise ValueError("new_token_ids is empty")
        state.row_mask_ids = ids
        for _, p in emb:
            if ids[-1] >= p.shape[0] or ids[0] < 0:
                raise ValueError(f"new_token_ids out of range for a {p.shape[0]}-row embedding")
            mask = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
            mask[ids] = 1

            def hook(grad, mask=mask):
                return grad * mask.to(grad.dtype)

            state.handles.append(p.register_hook(hook))
    model._dhad_freeze = state
    return state


def stage_param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Optimizer param groups for the current stage: trainable 2-D weights decay, except row-masked
    embeddings (stage 1 with new_token_ids), whose frozen rows must not decay; norms/biases never decay."""
    state = getattr(model, "_dhad_freeze", None)
    masked = state is not None and state.row_mask_ids is not None
    emb_ids = {id(p) for _, p in embedding_params(model)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or (masked and id(p) in emb_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
