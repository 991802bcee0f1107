"""Preference pairs and their log-probabilities under a model: what DPO trains on and what it measures.

- `Pair` / `load_pairs` (any iterable of dicts) / `validate_prefs` + `PairView` (prefs shards, memory-
  mapped, nothing materialised): usable pairs, and a count per reason of the rest (`PairReport`).
- `collate`: one forward's tensors for B pairs, in the shared-prompt token-tree layout (prompt once, both
  answers at the positions that follow it, the model's "may attend" mask keeping them apart) or TRL's
  concatenated one; `sequence_logps`: the [2B] summed answer log-probs from ONE forward.
- `compute_logps` (no grad, length-batched, dealt to the ranks of a process group) and
  `cached_reference_logps` (the same, read from / written to a safetensors file keyed by the reference
  model's fingerprint, the pairs and the precision).
The DPO objective and its losses are in dhad.train.dpo.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dhad.train import distributed as D

# ---------------------------------------------------------------------------------------------
# Pairs

@dataclass
class Pair:
    index: int                # position in its source split (the key of the reference cache)
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: str = ""          # the recipe's data source name
    split: str = "train"

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairReport:
    """What became of every pair handed to DPO: kept, or skipped with a reason."""
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)   # reason -> up to 5 "pair i: detail" strings
    prepared: str | None = None                    # what `dhad data prefs` dropped when it wrote the shards

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        lst = self.examples.setdefault(reason, [])
        if len(lst) < 5:
            lst.append(detail)

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped),
                "skipped_examples": self.examples, "prepared": self.prepared}

    def summary(self) -> str:
        s = f"{self.kept}/{self.total} pairs kept"
        if self.skipped:
            s += " (skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        return s


def _ids(item: Any, key: str) -> list[int]:
    x = item[key] if isinstance(item, dict) else getattr(item, key)
    if x is None:
        raise KeyError(key)
    if torch.is_tensor(x) or hasattr(x, "tolist"):
        x = x.tolist()
    out = [int(t) for t in x]
    return out


def load_pairs(source: Iterable[Any] | Sequence[Any], vocab_size: int, max_length: int | None,
               report: PairReport | None = None) -> tuple[list[Pair], PairReport]:
    """Validate pairs (dicts or objects with prompt_ids / chosen_ids / rejected_ids, e.g. a PrefsSet).

    Skipped, with a reason each: ``missing_fields``, ``bad_ids`` (not integers / outside the vocabulary),
    ``empty_prompt`` (the first answer token needs a prompt token to be predicted from), ``empty_answer``,
    ``identical``, ``too_long`` (prompt + longer answer > max_length)."""
    report = report or PairReport()
    pairs: list[Pair] = []
    it = iter(source)
    i = -1
    while True:
        i += 1
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception as e:  # a corrupt row in a reader: count it, keep going  # noqa: BLE001
            report.total += 1
            report.skip("unreadable", f"pair {i}: {type(e).__name__}: {e}")
            continue
        report.total += 1
        try:
            p, c, r = (_ids(item, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        except (KeyError, AttributeError, TypeError) as e:
            report.skip("missing_fields", f"pair {i}: missing {e}")
            continue
        except (ValueError, OverflowError) as e:
            report.skip("bad_ids", f"pair {i}: {e}")
            continue
        bad = [t for t in p + c + r if not 0 <= t < vocab_size]
        if bad:
            report.skip("bad_ids", f"pair {i}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
            continue
        if not p:
            report.skip("empty_prompt", f"pair {i}")
            continue
        if not c or not r:
            report.skip("empty_answer", f"pair {i}: {'chosen' if not c else 'rejected'} has no tokens")
            continue
        if c == r:
            report.skip("identical", f"pair {i}: chosen == rejected")
            continue
        n = len(p) + max(len(c), len(r))
        if max_length is not None and n > max_length:
            report.skip("too_long", f"pair {i}: {n} tokens > {max_length}")
            continue
        pairs.append(Pair(i, p, c, r))
    report.kept = len(pairs)
    return pairs, report


def pairs_fingerprint(pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256()
    for pr in pairs:
        for x in (pr.prompt, pr.chosen, pr.rejected):
            h.update(len(x).to_bytes(4, "little"))
            h.update(torch.tensor(x, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model's weights: names, shapes, dtypes and float64 sums (one pass over memory,
    no host copy of a 7B model), so a reference cache is never reused with different weights."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        if t.is_floating_point():
            d = t.double()
            h.update(f"{float(d.sum()):.17g}:{float(d.abs().sum()):.17g}:{float((d * d).sum()):.17g}".encode())
        else:
            h.update(f"{int(t.long().sum())}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Batches

def collate(pairs: Sequence[Pair], share_prompt: bool = True, pad_id: int = 0, device="cpu") -> dict:
    """Tensors for one forward over B pairs. Log-prob rows 0..B-1 are the chosen answers, B..2B-1 the rejected.

    share_prompt=True: one row per pair, ``prompt + chosen + rejected`` right-padded to [B, T] (tree_ids),
    with each token's position (tree_pos: both answers start where the prompt ends) and branch
    (tree_branch: 0 prompt, 1 chosen, 2 rejected, -1 padding); tree_out [B, n] the slots whose logits
    predict answer tokens (the prompt's last, then every answer token but each answer's last), and per
    answer token its (lp_row, lp_col) in those logits, lp_target and lp_owner (the log-prob row).
    share_prompt=False: input_ids/attention_mask [2B, T] right-padded, target_mask [2B, T-1] marks positions
    whose next token is an answer token (TRL's completion_mask shifted by one).
    """
    B = len(pairs)
    out: dict[str, Any] = {"index": torch.tensor([p.index for p in pairs], dtype=torch.long),
                           "n_chosen": torch.tensor([len(p.chosen) for p in pairs], dtype=torch.long),
                           "n_rejected": torch.tensor([len(p.rejected) for p in pairs], dtype=torch.long)}
    if share_prompt:
        T = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        n_out = max(len(p.chosen) + len(p.rejected) - 1 for p in pairs)
        ids, pos = torch.full((B, T), pad_id, dtype=torch.long), torch.zeros((B, T), dtype=torch.long)
        branch, slots = torch.full((B, T), -1, dtype=torch.long), torch.zeros((B, n_out), dtype=torch.long)
        row, col, target, owner = [], [], [], []
        for i, p in enumerate(pairs):
            n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
            ids[i, :n_p + n_c + n_r] = torch.tensor(p.prompt + p.chosen + p.rejected)
            pos[i, :n_p + n_c + n_r] = torch.cat([torch.arange(n_p), torch.arange(n_p, n_p + n_c),
                                                  torch.arange(n_p, n_p + n_r)])
            branch[i, :n_p + n_c + n_r] = torch.tensor([0] * n_p + [1] * n_c + [2] * n_r)
            # logits: [prompt's last | chosen but its last | rejected but its last]
            keep = [n_p - 1] + list(range(n_p, n_p + n_c - 1)) + list(range(n_p + n_c, n_p + n_c + n_r - 1))
            slots[i, :len(keep)] = torch.tensor(keep)
            # chosen[k] from column k (column 0: the prompt's last); rejected[0] from column 0 too,
            # rejected[k >= 1] from column n_c - 1 + k
            row += [i] * (n_c + n_r)
            col += list(range(n_c)) + [0] + list(range(n_c, n_c + n_r - 1))
            target += p.chosen + p.rejected
            owner += [i] * n_c + [B + i] * n_r
        out.update(tree_ids=ids, tree_pos=pos, tree_branch=branch, tree_out=slots, lp_row=torch.tensor(row),
                   lp_col=torch.tensor(col), lp_target=torch.tensor(target), lp_owner=torch.tensor(owner))
    else:
        seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        starts = [len(p.prompt) for p in pairs] * 2
        T = max(len(s) for s in seqs)
        ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
        att = torch.zeros((2 * B, T), dtype=torch.long)
        tgt = torch.zeros((2 * B, T - 1), dtype=torch.bool)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
            tgt[i, st - 1:len(s) - 1] = True
        out.update(input_ids=ids, attention_mask=att, target_mask=tgt)
    return {k: v.to(device) for k, v in out.items()}


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32, without materialising the full log-softmax."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """[2B] summed log-probs of each answer (chosen rows first), from ONE forward of `model` over the pair batch."""
    if "tree_ids" in batch:
        return _tree_logps(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # [2B, T, V]
    mask = batch["target_mask"]
    lp = _token_logps(logits[:, :-1][mask], batch["input_ids"][:, 1:][mask])
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(mask.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def _tree_logps(model, batch: dict) -> torch.Tensor:
    ids, pos, br = batch["tree_ids"], batch["tree_pos"], batch["tree_branch"]
    # a token sees earlier positions of the prompt and of its own branch
    allowed = ((pos[:, None, :] <= pos[:, :, None]) & (br[:, None, :] >= 0)
               & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])))
    logits = model(ids, positions=pos, mask=allowed, keep=batch["tree_out"])  # [B, n, V]
    lp = _token_logps(logits[batch["lp_row"], batch["lp_col"]], batch["lp_target"])
    return torch.zeros(2 * ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, batch["lp_owner"], lp)


# ---------------------------------------------------------------------------------------------
# Reference log-probabilities

def autocast_context(device, dtype: torch.dtype | None):
    """bf16 autocast on `device` when dtype is bf16/fp16, else nothing (fp32 runs)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _length_order(pairs: Sequence[Pair]) -> list[int]:
    if hasattr(pairs, "lengths"):  # a PairView: lengths without reading the pairs
        L = pairs.lengths()
        return sorted(range(len(pairs)), key=lambda i: (int(L[i][0]), int(L[i][0] + max(L[i][1], L[i][2]))))
    return sorted(range(len(pairs)), key=lambda i: (len(pairs[i].prompt), len(pairs[i])))


@torch.no_grad()
def compute_logps(model, pairs: Sequence[Pair], batch_size: int = 16, share_prompt: bool = True,
                  device=None, autocast_dtype: torch.dtype | None = None, progress: bool = False,
                  desc: str = "reference log-probs") -> torch.Tensor:
    """[len(pairs), 2] (chosen, rejected) summed answer log-probs under `model`, no grad.

    Pairs are batched in length order (little padding) and the results put back in input order. Under
    torch.distributed every rank computes a slice and the slices are all-gathered, each rank running
    the same number of forwards (FSDP needs every rank in every forward)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = _length_order(pairs)
    env = D.current_env(device)
    world, rank = env.world_size, env.rank
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    n_local = math.ceil(len(batches) / world)
    mine = batches[rank::world] + [batches[0]] * (n_local - len(batches[rank::world]))  # pad with a dummy
    out = torch.full((len(pairs), 2), float("nan"), dtype=torch.float32, device=device)
    bar = _progress(len(mine), desc, progress and rank == 0)
    results = []
    for k, idx in enumerate(mine):
        with autocast_context(device, autocast_dtype):
            lp = sequence_logps(model, collate([pairs[i] for i in idx], share_prompt, device=device)).float()
        real = k < len(batches[rank::world])
        results.append((idx if real else [], lp.view(2, -1).T))
        bar.update(1)
    bar.close()
    for idx, lp in results:
        if idx:
            out[torch.tensor(idx, device=device)] = lp
    if world > 1:
        gathered = [torch.empty_like(out) for _ in range(world)]
        torch.distributed.all_gather(gathered, out)
        for g in gathered:
            ok = ~torch.isnan(g[:, 0])
            out[ok] = g[ok]
    model.train(was_training)
    return out.cpu()


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="batch", leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass
    return _Null()


def init_fingerprint(init: Any) -> str:
    """Identity of the reference model: weights of an in-memory model, or a model directory's
    config.json bytes plus its weight files' names, sizes and modification times (no 7B load needed)."""
    if isinstance(init, torch.nn.Module):
        return "weights:" + model_fingerprint(init)
    d = Path(init)
    h = hashlib.sha256()
    cfg = d / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.safetensors.index.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "dir:" + h.hexdigest()


def cached_reference_logps(model, pairs: Sequence[Pair], path: str | os.PathLike, key: str, *,
                           batch_size: int = 16, share_prompt: bool = True, device=None,
                           autocast_dtype: torch.dtype | None = None, progress: bool = True,
                           desc: str = "reference log-probs") -> tuple[torch.Tensor, bool]:
    """Reference log-probs of `pairs`, read from `path` when it was written for the same key (reference
    model + pair ids + precision), else computed with `model` and written atomically.
    Returns ([n, 2] tensor, whether it came from the cache)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = Path(path)
    layout = "tree" if share_prompt else "concatenated"  # (earlier runs' shared-prompt KV-cache layout: recomputed)
    full_key = hashlib.sha256(f"{key}|{pairs_fingerprint(pairs)}|{autocast_dtype}|{layout}".encode()).hexdigest()
    t = None
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == full_key:
                    t = f.get_tensor("logps")
                    if t.shape != (len(pairs), 2):
                        t = None
        except Exception:  # noqa: BLE001 - a torn or foreign file is recomputed, never trusted
            t = None
    # Every rank must take the same branch: computing is collective (all_gather). A rank that cannot
    # read the cache (no shared filesystem, a file replaced meanwhile) makes all of them recompute.
    env = D.current_env(device or next(model.parameters()).device)
    if not D.any_flag(t is None, env):
        return t, True
    t = compute_logps(model, pairs, batch_size, share_prompt, device, autocast_dtype, progress, desc)
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file({"logps": t.contiguous(), "index": torch.tensor([p.index for p in pairs], dtype=torch.long)},
                  str(tmp), metadata={"key": full_key, "n": str(len(pairs))})
        os.replace(tmp, path)
    return t, False




# ---------------------------------------------------------------------------------------------
# Pairs straight from prefs shards (memory-mapped; nothing materialised)

class PairView:
    """The valid pairs of one prefs split as a lazy sequence of `Pair` (a 260K-pair set is never held
    as Python lists). `keep` are the source indices that passed validation."""

    def __init__(self, ps, keep: list[int], source: str, split: str):
        self.ps, self.keep, self.source, self.split = ps, keep, source, split

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, j: int) -> Pair:
        i = self.keep[j]
        x = self.ps[i]
        return Pair(i, x["prompt_ids"].tolist(), x["chosen_ids"].tolist(), x["rejected_ids"].tolist(),
                    self.source, self.split)

    def __iter__(self):
        for j in range(len(self)):
            yield self[j]

    def lengths(self):
        return self.ps.lengths()[self.keep]

    def restrict(self, max_length: int | None, report: PairReport) -> None:
        """Drop (and count) pairs longer than max_length: prompt + the longer answer."""
        if max_length is None:
            return
        L = self.ps.lengths()
        kept = []
        for i in self.keep:
            n = int(L[i][0] + max(L[i][1], L[i][2]))
            if n > max_length:
                report.skip("too_long", f"{self.source}/{self.split} pair {i}: {n} tokens > {max_length}")
            else:
                kept.append(i)
        self.keep[:] = kept
        report.kept = len(kept)


def validate_prefs(ps, vocab_size: int, source: str, split: str, report: PairReport | None = None,
                   max_length: int | None = None) -> tuple[PairView, PairReport]:
    """One streaming pass over a PrefsSet: the indices of usable pairs, and a count of the rest per reason
    (a shard written by an older or foreign tool may hold what `dhad data prefs` would have dropped)."""
    import numpy as np
    report = report or PairReport()
    keep = []
    for i in range(len(ps)):
        report.total += 1
        try:
            x = ps[i]
            p, c, r = x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]
        except Exception as e:  # noqa: BLE001 - a torn shard row: counted, skipped
            report.skip("unreadable", f"{source}/{split} pair {i}: {type(e).__name__}: {e}")
            continue
        where = f"{source}/{split} pair {i}"
        if len(p) == 0:
            report.skip("empty_prompt", where)
        elif len(c) == 0 or len(r) == 0:
            report.skip("empty_answer", f"{where}: {'chosen' if len(c) == 0 else 'rejected'} has no tokens")
        elif len(c) == len(r) and np.array_equal(c, r):
            report.skip("identical", where)
        elif max(int(p.max()), int(c.max()), int(r.max())) >= vocab_size or min(int(p.min()), int(c.min()), int(r.min())) < 0:
            report.skip("bad_ids", f"{where}: token id outside the vocabulary [0, {vocab_size})")
        elif max_length is not None and len(p) + max(len(c), len(r)) > max_length:
            report.skip("too_long", f"{where}: {len(p) + max(len(c), len(r))} tokens > {max_length}")
        else:
            keep.append(i)
    report.kept = len(keep)
    return PairView(ps, keep, source, split), report


def processed_tokens(pairs: Sequence[Pair], share_prompt: bool) -> int:
    """Real (non-padding) tokens one forward over `pairs` runs through the policy: prompt once + both
    answers in the shared-prompt layout; prompt + answer per row (the prompt twice) in the concatenated one."""
    return sum((1 if share_prompt else 2) * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


class _Prefix:
    """The first n pairs of a PairView (the held-out pairs an evaluation uses)."""

    def __init__(self, view: PairView, n: int):
        self.view, self.n = view, min(n, len(view))
        self.ps = view.ps

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        if j >= self.n:
            raise IndexError(j)
        return self.view[j]

    def __iter__(self):
        for j in range(self.n):
            yield self.view[j]

    def lengths(self):
        return self.view.lengths()[:self.n]


def _prefs_report(path) -> str | None:
    """What `dhad data prefs` dropped when it wrote these shards (from its prefs_report.json), one line."""
    f = Path(path) / "prefs_report.json"
    if not f.is_file():
        return None
    try:
        r = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    dropped = {**(r.get("inputs", {}).get("skipped") or {}), **(r.get("dropped") or {})}
    return f"dhad data prefs dropped {sum(dropped.values())} rows: {dropped}" if dropped else None
