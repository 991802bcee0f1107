"""Log-likelihood scoring: a question's choices as one token tree, batched and deterministic.

The numbers are lm-evaluation-harness's (`api/model.py::_encode_pair`, `models/huggingface.py`):
- a request (context, continuation) is tokenized as the harness does: trailing spaces of the context
  move to the continuation, `whole = encode(context + continuation)`, `ctx = encode(context)`,
  `cont = whole[len(ctx):]` (special tokens as the tokenizer's config says, so BOS when it adds one);
- the model reads `(ctx + cont)[-(max_length + 1):][:-1]` and the score is the sum of the log-softmax
  of the continuation tokens; `is_greedy` says whether argmax would have produced them.

The harness's `hf` backend runs every request whole and computes logits and a full-vocabulary
log-softmax at every position. What dhad does instead, with the same numbers:
- **token trees**: the inputs of one question's choices share a prefix (few-shot context and
  question). They become one tree: the shared *trunk* once, then each distinct remainder as a
  *branch*, in one row, under an attention mask by which a branch sees the trunk and itself only.
  Every token keeps the position it has in its own unshared sequence, so RoPE angles and ALiBi
  distances are unchanged. Identical inputs (single-token choices "A".."D") are one branch;
- **packing**: trees are sorted longest first and packed first-fit into rows as wide as the
  longest tree of the batch (several short trees per row, each its own segment); a batch ends
  rather than pad a new row by more than a few tokens, so padding is almost nil;
- **computing only what is scored**: the last block's queries, attention, output projection and
  MLP, the final norm, the LM head and the log-softmax run only at the distinct positions that
  predict continuation tokens (every token still contributes keys and values). The head goes in
  chunks whose logits stay in cache, reduced in place to log p(token) and argmax, never writing a
  full-vocabulary log-softmax;
- **shared blocks**: questions that start with the same long token run (a `first_n` few-shot
  block, an MMLU description) are batched together; the run is computed once into per-layer keys
  and values that every row of the batch attends to.
The model side is `Transformer.hidden_states` with the tree as its "may attend" mask and each
token's position (ALiBi distances by position), ``keep`` (the last block at the scored slots only) and
a `KVCache.from_prefix` holding the shared block; the LM-head reductions are here.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dhad.kv_cache import KVCache

MIN_SHARED = 32          # tokens a batch of questions must share before it is worth a block pass
MASK_ELEMS = 1 << 24     # attention-mask entries per batch (rows x [heads] x width x keys): 64 MiB in fp32
ROW_PAD = 4              # padding tokens a new row may have before a narrower batch is cheaper
PACK_SLACK = 0.4         # x n_embd: how much shorter than its row a packed tree may be (see _pack)
HEAD_CHUNK = 256         # positions per LM-head chunk: its logits stay in cache for the reductions


@dataclass
class _Tree:
    """One question's requests as a trunk + branches, laid out as one segment of a row."""
    index: int                       # the question (group)
    tokens: list[int]                # trunk, then each branch
    pos: list[int]                   # each token's position in its own unshared sequence
    branch: list[int]                # 0 = trunk, b > 0 = b-th branch
    scored: list[list[int]]          # per request: offsets (in `tokens`) whose logits score its continuation
    conts: list[list[int]]           # per request: continuation tokens
    key_len: list[int] | None = None  # per token: its sequence's length (ALiBi train_seq_len scaling only)

    def __len__(self) -> int:
        return len(self.tokens)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models (context must be non-empty)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


class Scorer:
    """Scores (context, continuation) requests with a dhad Transformer and tokenizer."""

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_tokens: int = 16384,
                 max_rows: int = 64, add_special_tokens: bool = True):
        self.model = model
        self.tok = tokenizer
        self.max_length = int(max_length or model.config.block_size)
        self.batch_tokens = batch_tokens
        self.max_rows = max_rows
        self.add_special_tokens = add_special_tokens
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        # ALiBi scaled by the key length past train_seq_len: a shared trunk would see a different
        # length than each unshared sequence, so such long inputs are scored unshared (bs=1 numbers)
        sc = getattr(model.config, "alibi_scaling", None) or {}
        self._alibi_train_len = sc.get("train_seq_len") if model.config.position == "alibi" and sc.get("factor") is None else None
        self._pack_slack = int(PACK_SLACK * model.config.n_embd)
        self._mask_heads = model.config.n_head if model.config.position == "alibi" else 1  # ALiBi masks are per head

    # -- tokenization ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special_tokens)

    def encode_groups(self, groups: Sequence[Sequence[tuple[str, str]]]) -> list[list[tuple[list[int], list[int]]]]:
        """Token pairs for every request, with each distinct context string encoded once."""
        texts: dict[str, int] = {}
        plan = []
        for reqs in groups:
            g = []
            for context, continuation in reqs:
                if context == "":
                    g.append(("", continuation, None, None))
                    continue
                n = len(context) - len(context.rstrip())
                ctx, cont = (context[:-n], context[-n:] + continuation) if n else (context, continuation)
                g.append((ctx, cont, texts.setdefault(ctx, len(texts)), texts.setdefault(ctx + cont, len(texts))))
            plan.append(g)
        order = list(texts)
        if hasattr(self.tok, "encode_batch"):
            enc = self.tok.encode_batch(order, add_special_tokens=self.add_special_tokens)
        else:
            enc = [self.encode(t) for t in order]
        out = []
        for g in plan:
            pairs = []
            for ctx, cont, ci, wi in g:
                if ci is None:  # empty context: the prefix token (BOS, else EOS) conditions the text
                    c = self.tok.encode(cont, add_special_tokens=False)
                    pairs.append(([self.prefix_token_id], c) if c[0] != self.prefix_token_id else (c[:1], c[1:]))
                else:
                    ctx_ids = enc[ci]
                    pairs.append((ctx_ids, enc[wi][len(ctx_ids):]))
            out.append(pairs)
        return out

    # -- scoring -----------------------------------------------------------------------------
    def loglikelihood(self, groups: Sequence[Sequence[tuple[str, str]]], progress=None) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is_greedy) per request; a group is the requests of one question."""
        return self.loglikelihood_tokens(self.encode_groups(groups), progress=progress)

    @torch.inference_mode()
    def loglikelihood_tokens(self, groups: Sequence[Sequence[tuple[list[int], list[int]]]],
                             progress=None) -> list[list[tuple[float, bool]]]:
        L = self.max_length
        prepared = []  # (group index, model inputs, continuations)
        for gi, pairs in enumerate(groups):
            inputs, conts = [], []
            for ctx, cont in pairs:
                if not cont or not ctx:
                    raise ValueError("empty context or continuation tokens: nothing to condition on or score")
                if len(cont) > L:
                    raise ValueError(f"continuation of {len(cont)} tokens is longer than the context window {L}")
                seq = (list(ctx) + list(cont))[-(L + 1):]  # left-truncate as the harness does
                inputs.append(seq[:-1])
                conts.append(list(cont))
            prepared.append((gi, inputs, conts))
        results: list[list[tuple[float, bool]] | None] = [None] * len(groups)
        for block, trees in self._plan(prepared):
            kv = _block_cache(self.model, block) if block else None
            for rows in self._pack(trees, len(block)):
                for t, res in zip((t for row in rows for t in row), self._run(rows, kv)):
                    results[t.index] = res
                if progress is not None:
                    progress.update(sum(len(t.conts) for row in rows for t in row))
        return results  # type: ignore[return-value]

    def _plan(self, prepared):
        """Yield (shared block tokens, trees). Questions whose inputs start with the same long token
        run (>= MIN_SHARED tokens, before any scored position) form one run with that block; the
        others are trees of their own, all packed together."""
        order = sorted(prepared, key=lambda g: g[1][0])
        runs, cur = [], order[:1]
        for a, b in itertools.pairwise(order):
            if _lcp(a[1][0], b[1][0]) >= MIN_SHARED:
                cur.append(b)
            else:
                runs.append(cur)
                cur = [b]
        if cur:
            runs.append(cur)
        lonely = []
        for run in runs:
            share = all(self._shareable(ins) for _, ins, _ in run)
            start = 0
            if len(run) > 1 and share:
                ref = run[0][1][0]
                start = min(min(_lcp(ref, x) for _, ins, _ in run for x in ins),
                            *(min(len(x) - len(c) for x, c in zip(ins, cs)) for _, ins, cs in run))
            if start >= MIN_SHARED:
                yield ref[:start], [_tree(gi, ins, cs, start) for gi, ins, cs in run]
            else:
                lonely += [_tree(gi, ins, cs, 0, share=self._shareable(ins), key_len=self._alibi_train_len is not None)
                           for gi, ins, cs in run]
        if lonely:
            yield [], lonely

    def _shareable(self, inputs) -> bool:
        n = self._alibi_train_len
        return n is None or max(len(x) for x in inputs) <= n

    def _pack(self, trees: list[_Tree], block: int):
        """Batches of rows: trees longest first, each batch's rows as wide as its first tree W.

        Several trees may share a row (first-fit, each its own segment), but their tokens then
        attend over the whole row: a tree is *packable* only if it is at most PACK_SLACK x n_embd
        tokens shorter than W (that much extra attention is small next to a token's matmuls).
        Padding costs every layer, a new batch only a few milliseconds, so a tree that fits no row
        opens a new one only if its padding is at most ROW_PAD tokens or it is packable and at
        most W/2 long (later trees fill the row); otherwise the batch ends and a narrower one
        begins. Rows are capped by max_rows, the token budget and MASK_ELEMS."""
        trees = sorted(trees, key=lambda t: (-len(t), t.index))
        i = 0
        while i < len(trees):
            W = len(trees[i])
            # the token budget also bounds the copies of a shared block's keys/values (one per row)
            cap = max(1, min(self.max_rows, self.batch_tokens // (W + block),
                             MASK_ELEMS // (W * (block + W) * self._mask_heads)))
            rows: list[list[_Tree]] = []
            fill: list[int] = []
            j = i
            while j < len(trees):
                n = len(trees[j])
                packable = W - n <= self._pack_slack
                for r, f in enumerate(fill):
                    if f + n <= W and packable:
                        rows[r].append(trees[j])
                        fill[r] = f + n
                        break
                else:
                    if len(rows) == cap or (rows and W - n > ROW_PAD and not (packable and n * 2 <= W)):
                        break
                    rows.append([trees[j]])
                    fill.append(n)
                j += 1
            yield rows
            i = j

    def _run(self, rows: list[list[_Tree]], kv) -> list[list[tuple[float, bool]]]:
        """Score the trees of one batch (in row order) in one forward pass."""
        R = len(rows)
        T = max(sum(len(t) for t in row) for row in rows)
        ids, pos, seg, br = [0] * (R * T), [0] * (R * T), [-1] * (R * T), [0] * (R * T)
        klen = [1] * (R * T) if self._alibi_train_len is not None else None
        out_slots: list[list[int]] = []  # per row: the distinct slots whose logits are scored
        entry, target, owner, n_req, n_out = [], [], [], 0, 0
        for r, row in enumerate(rows):
            where: dict[int, int] = {}  # slot -> index among this row's scored slots
            c = 0  # the tree's first slot in the row
            for s, t in enumerate(row):
                n, o = len(t), r * T + c
                ids[o:o + n], pos[o:o + n], br[o:o + n], seg[o:o + n] = t.tokens, t.pos, t.branch, [s] * n
                if klen is not None and t.key_len is not None:
                    klen[o:o + n] = t.key_len
                for sc, cont in zip(t.scored, t.conts):  # choices often share a scored position
                    entry += [n_out + where.setdefault(c + k, len(where)) for k in sc]
                    target += cont
                    owner += [n_req] * len(cont)
                    n_req += 1
                c += n
            out_slots.append(list(where))
            n_out += len(where)
        ids_t, pos_t = torch.tensor(ids).view(R, T), torch.tensor(pos).view(R, T)
        seg_t, br_t = torch.tensor(seg).view(R, T), torch.tensor(br).view(R, T)
        # a token sees: its own segment (tree), earlier positions, and the trunk or its own branch
        allowed = ((seg_t[:, :, None] == seg_t[:, None, :]) & (pos_t[:, None, :] <= pos_t[:, :, None])
                   & ((br_t[:, None, :] == 0) | (br_t[:, None, :] == br_t[:, :, None])))
        dev = self.model.device
        n_max = max(len(x) for x in out_slots)
        out_t = torch.tensor([x + [0] * (n_max - len(x)) for x in out_slots], device=dev)
        hidden = _forward(self.model, ids_t.to(dev), pos_t.to(dev), allowed.to(dev), out_t, block=kv,
                          key_len=torch.tensor(klen).view(R, T).to(dev) if klen is not None else None)
        hidden = hidden.reshape(R * n_max, -1)
        if n_out < R * n_max:  # drop the padding of the per-row slot lists
            hidden = hidden.index_select(0, torch.tensor([r * n_max + j for r, x in enumerate(out_slots)
                                                          for j in range(len(x))], device=dev))
        lp, miss = _token_logprobs(self.model, hidden, torch.tensor(entry, device=dev), torch.tensor(target, device=dev))
        own = torch.tensor(owner, device=dev)
        lls = torch.zeros(n_req, dtype=torch.float64, device=dev).index_add_(0, own, lp.double()).tolist()
        bad = torch.zeros(n_req, dtype=torch.float64, device=dev).index_add_(0, own, miss).tolist()
        out, q = [], 0
        for row in rows:
            for t in row:
                k = len(t.conts)
                out.append([(lls[q + i], bad[q + i] == 0) for i in range(k)])
                q += k
        return out


def _block_cache(model, block: list[int]) -> KVCache:
    """Keys/values of a shared block (positions 0..S0-1), computed once for a batch of questions;
    no position of it is scored, so its last layer computes keys and values only."""
    dev = model.device
    cache = KVCache.empty(model.config, 1, len(block), dtype=model.dtype, device=dev)
    model.hidden_states(torch.tensor([block], device=dev), cache=cache,
                        keep=torch.empty(1, 0, dtype=torch.long, device=dev))
    return cache


def _forward(model, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, out: torch.Tensor,
             block: KVCache | None = None, key_len: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states [R, n, d] at the slots ``out`` [R, n] of rows ``ids`` [R, T] whose
    tokens sit at positions ``pos`` and see the tokens ``allowed`` [R, T, T] (query, key) says --
    and, first, every token of the shared ``block`` cache. The tree goes to the model as its
    "may attend" mask (ALiBi distances are then by position); `Transformer.hidden_states` runs the
    last block only at ``out``."""
    R, T = ids.shape
    S0 = int(block.lengths[0]) if block is not None else 0
    if S0:
        allowed = torch.cat([allowed.new_ones(R, T, S0), allowed], dim=-1)
    cache = KVCache.from_prefix(block, R, S0 + T) if block is not None else None
    return model.hidden_states(ids, positions=pos, mask=allowed, cache=cache, keep=out, alibi_len=key_len)


def _token_logprobs(model, hidden: torch.Tensor, entry: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token e: log p(target[e]) at hidden state entry[e], and 1.0 where target[e] is
    not the argmax. hidden [U, d] are final-norm states of distinct positions.

    The LM head runs on HEAD_CHUNK positions at a time, so each chunk's logits are still in cache
    for the reductions, done in place: log p(t) = (x_t - max) - log(sum(exp(x - max))), the
    arithmetic of log_softmax without writing its full-vocabulary output; t is greedy iff x_t is
    the maximum and no earlier token ties it (argmax returns the first maximum, as in the harness).
    """
    scale = model.config.logits_scale
    order = torch.argsort(entry, stable=True)  # entries grouped by position, chunk by chunk
    eu, et = entry[order], target[order]
    U = hidden.shape[0]
    bounds = torch.searchsorted(eu, torch.arange(0, U + HEAD_CHUNK, HEAD_CHUNK, device=eu.device)).tolist()
    lps, misses = [], []
    for c, a in enumerate(range(0, U, HEAD_CHUNK)):
        logits = model.lm_head(hidden[a:a + HEAD_CHUNK])
        if scale != 1.0:
            logits = logits * scale
        logits = logits.float()
        r, t = eu[bounds[c]:bounds[c + 1]] - a, et[bounds[c]:bounds[c + 1]]
        m = logits.amax(-1, keepdim=True)
        xt = logits[r, t] - m[r, 0]
        logits.sub_(m)  # maxima are exactly 0 now
        hit = xt >= 0
        if bool(hit.any()):  # t is a maximum: greedy only if it is the first one
            rows = hit.nonzero()[:, 0]
            hit[rows] = (logits[r[rows]] == 0).to(torch.uint8).argmax(-1) == t[rows]
        lse = logits.exp_().sum(-1).log_()
        lps.append(xt - lse[r])
        misses.append((~hit).to(torch.float64))
    lp, miss = torch.empty_like(torch.cat(lps)), torch.empty(len(order), dtype=torch.float64, device=eu.device)
    lp[order], miss[order] = torch.cat(lps), torch.cat(misses)
    return lp, miss


def _lcp(a, b) -> int:
    """Length of the common prefix of two token lists (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _tree(index: int, inputs: list[list[int]], conts: list[list[int]], start: int, share: bool = True,
          key_len: bool = False) -> _Tree:
    """The tree of one question: tokens from `start` on (before it: a shared block), the common
    prefix of its inputs once (unless share=False), then each distinct remainder."""
    p = start
    if share:
        p = min(len(x) for x in inputs)
        for x in inputs[1:]:
            p = min(p, _lcp(inputs[0], x))
    tokens, pos, branch = list(inputs[0][start:p]), list(range(start, p)), [0] * (p - start)
    klen = [max(len(x) for x in inputs)] * (p - start) if key_len else None
    where: dict[tuple, int] = {}
    for x in inputs:
        rest = tuple(x[p:])
        if rest and rest not in where:
            where[rest] = len(tokens)
            tokens += rest
            pos += range(p, len(x))
            branch += [len(where)] * len(rest)
            if klen is not None:
                klen += [len(x)] * len(rest)
    scored = []
    for x, cont in zip(inputs, conts):
        off = where.get(tuple(x[p:]), 0)
        n = len(x)
        scored.append([k - start if k < p else off + k - p for k in range(n - len(cont), n)])
    return _Tree(index, tokens, pos, branch, scored, [list(c) for c in conts], klen)


# ---------------------------------------------------------------------------------------------
# Metrics (lm-eval `process_results` for multiple_choice, and TruthfulQA mc2)

def score_example(lls: Sequence[float], choices: Sequence[str], gold: int, mc2_labels=None) -> dict:
    """acc / acc_norm of one question from its choices' log-likelihoods (numpy argmax: first max wins)."""
    pred = _argmax(lls)
    pred_norm = _argmax([ll / float(len(c)) for ll, c in zip(lls, choices)])
    out = {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
    if mc2_labels is not None:
        # mass of the true answers after normalising exp(ll) over all choices (lm-eval truthfulqa utils)
        m = max(lls)
        probs = [math.exp(x - m) for x in lls]
        z = sum(probs)
        out["acc"] = sum(p for p, lab in zip(probs, mc2_labels) if lab == 1) / z
    return out


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best
