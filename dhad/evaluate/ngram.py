"""A count-based baseline: an interpolated modified Kneser–Ney n-gram model over token ids.

    counts = NgramCounts(train_ids, max_order=5, vocab_size=V)    # every order's counts, once
    lm = KneserNey(counts, order=3)
    res = ngram_bits_per_byte(lm, tokenizer, heldout_texts)        # scored like evaluate.bpb.bits_per_byte

What a transformer's held-out bits per byte mean depends on the data; the same number for a model that
only counts word sequences in the same training tokens says how much of it is word statistics. This is
Chen & Goodman's (1998) interpolated Kneser–Ney with modified discounts, the estimator KenLM builds:

    p_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h)  +  gamma_k(h) * p_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3 N3+(h .)) / c_k(h)        p_0(w) = 1 / V

h' is h without its first token; c_k(h) = sum_w c_k(h w); Nr(h .) counts the words after h whose count
is r (3+: at least 3); a history never seen at level k gives p_k = p_{k-1}. At the model's own order
c_k is the raw count; at every lower order it is the continuation count N1+(. h w), the number of
distinct tokens seen before h w. Discounts per order from its counts of counts n1..n4:
Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3; where those are
undefined or out of range (tiny corpora) KenLM's --discount_fallback values 0.5, 1, 1.5 are used.

Why not a library: KenLM builds models with its `lmplz` binary (the PyPI package only queries), and
NLTK's `KneserNeyInterpolated` has one discount and scores in pure Python, far too slow for the
millions of tokens a speedrun trains on. Here every order is a sorted array of exact integer keys
(base-V digits of the n-gram, so the order is limited to V^order < 2^63), counted with `np.unique`
and looked up with `np.searchsorted`: a few seconds for millions of tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults


def max_order_for(vocab_size: int) -> int:
    """The largest order whose keys (base-V digits) fit in a signed 64-bit integer."""
    return max(1, int(63 // math.log2(max(vocab_size, 2))))


def discounts(counts: np.ndarray) -> tuple[tuple[float, float, float], bool]:
    """(D1, D2, D3+) from the counts of counts of `counts`; second item False when the fallback was used."""
    n = [int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4)]
    if min(n) > 0:
        y = n[0] / (n[0] + 2 * n[1])
        d = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
        if all(0 < x <= r for x, r in zip(d, (1, 2, 3))):
            return d, True
    return FALLBACK_DISCOUNTS, False


@dataclass
class Level:
    """One order's table: sorted n-gram keys with their counts, and per history (key // V) its total,
    the numbers of followers with count 1, 2 and 3+, and the discounts."""
    keys: np.ndarray
    counts: np.ndarray
    ctx: np.ndarray
    ctx_total: np.ndarray
    ctx_gamma_num: np.ndarray  # D1 N1 + D2 N2 + D3 N3+
    d: tuple[float, float, float]
    modified: bool  # discounts estimated (False: fallback)

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> "Level":
        d, modified = discounts(counts)
        ctx_all = keys // vocab_size
        ctx, starts = np.unique(ctx_all, return_index=True)
        total = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, np.int64)
        nr = [np.add.reduceat((counts == r).astype(np.int64), starts) for r in (1, 2)] if len(starts) else [total] * 2
        n3 = np.add.reduceat((counts >= 3).astype(np.int64), starts) if len(starts) else total
        gamma_num = d[0] * nr[0] + d[1] * nr[1] + d[2] * n3
        return cls(keys, counts, ctx, total.astype(np.float64), gamma_num.astype(np.float64), d, modified)


def _keys(tokens: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """Base-V keys of every k-gram of `tokens` (position i: tokens[i:i+k])."""
    out = tokens[: len(tokens) - k + 1].astype(np.int64)
    for j in range(1, k):
        out = out * vocab_size + tokens[j: len(tokens) - k + 1 + j]
    return out


def _lookup(keys: np.ndarray, values: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, value or 0) for every query key in a sorted key array."""
    if len(keys) == 0:
        return np.zeros(len(q), bool), np.zeros(len(q), values.dtype)
    i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    found = keys[i] == q
    return found, np.where(found, values[i], 0)


class NgramCounts:
    """Raw and continuation counts of every order up to `max_order` of one token stream."""

    def __init__(self, tokens, max_order: int, vocab_size: int):
        tokens = np.asarray(tokens, dtype=np.int64)
        if max_order < 1:
            raise ValueError(f"max_order must be >= 1, got {max_order}")
        if max_order > max_order_for(vocab_size):
            raise ValueError(f"order {max_order} with a vocabulary of {vocab_size}: keys would not fit in 64 "
                             f"bits (at most order {max_order_for(vocab_size)})")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        self.vocab_size, self.max_order, self.n_tokens = vocab_size, max_order, len(tokens)
        self.raw: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(1, max_order + 1):
            if len(tokens) >= k:
                self.raw[k] = np.unique(_keys(tokens, k, vocab_size), return_counts=True)
            else:
                self.raw[k] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        # continuation count of a k-gram: distinct tokens before it = distinct (k+1)-grams ending with it
        self.cont: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(1, max_order):
            suffix = self.raw[k + 1][0] % (vocab_size ** k)
            self.cont[k] = np.unique(suffix, return_counts=True)
        self._levels: dict[tuple[int, str], Level] = {}

    def level(self, k: int, kind: str) -> Level:
        if (k, kind) not in self._levels:
            keys, counts = (self.raw if kind == "raw" else self.cont)[k]
            self._levels[(k, kind)] = Level.build(keys, counts.astype(np.int64), self.vocab_size)
        return self._levels[(k, kind)]


class KneserNey:
    """The order-`order` interpolated modified Kneser–Ney model of `counts` (see the module docstring)."""

    def __init__(self, counts: NgramCounts, order: int):
        if not 1 <= order <= counts.max_order:
            raise ValueError(f"order {order}: the counts go up to order {counts.max_order}")
        self.order, self.vocab_size = order, counts.vocab_size
        self.levels = [counts.level(k, "raw" if k == order else "cont") for k in range(1, order + 1)]

    def logprobs(self, stream) -> np.ndarray:
        """ln p(stream[i] | stream[:i]) for i = 1 .. len - 1 (the history is at most order - 1 tokens)."""
        s = np.asarray(stream, dtype=np.int64)
        n = len(s) - 1
        if n <= 0:
            return np.zeros(0)
        V = self.vocab_size
        p = np.full(n, 1.0 / V)
        target = s[1:]
        for k, lev in enumerate(self.levels, start=1):
            # positions i (targets s[i], i >= 1) with k - 1 tokens of history: i >= k - 1
            first = max(k - 1, 1)
            idx = np.arange(first, len(s))
            hist = _keys(s[:-1], k - 1, V)[first - (k - 1):] if k > 1 else np.zeros(len(idx), np.int64)
            seen, total = _lookup(lev.ctx, lev.ctx_total, hist)
            _, gnum = _lookup(lev.ctx, lev.ctx_gamma_num, hist)
            _, c = _lookup(lev.keys, lev.counts, hist * V + target[first - 1:])
            d = np.select([c == 0, c == 1, c == 2], [0.0, lev.d[0], lev.d[1]], lev.d[2])
            safe = np.where(seen, total, 1.0)
            pk = np.maximum(c - d, 0.0) / safe + gnum / safe * p[first - 1:]
            p[first - 1:] = np.where(seen, pk, p[first - 1:])
        return np.log(p)

    def prob(self, history, w: int) -> float:
        """p(w | history) for one token (the last order - 1 tokens of `history` count)."""
        h = list(history)[-(self.order - 1):] if self.order > 1 else []
        return float(np.exp(self.logprobs(np.asarray(h + [w]))[-1])) if h else \
            float(np.exp(self._unigram_logprob(w)))

    def _unigram_logprob(self, w: int) -> float:
        # a one-token stream has no target: score w after a history that no level has seen (-> level 1)
        lev = self.levels[0]
        c = _lookup(lev.keys, lev.counts, np.asarray([w]))[1][0]
        d = 0.0 if c == 0 else lev.d[min(int(c), 3) - 1]
        total = lev.ctx_total[0] if len(lev.ctx_total) else 0.0
        if total == 0:
            return -math.log(self.vocab_size)
        return math.log(max(c - d, 0.0) / total + lev.ctx_gamma_num[0] / total / self.vocab_size)


def ngram_bits_per_byte(lm: KneserNey, tok, texts: list[str]) -> dict:
    """Held-out bits per byte of `texts` under `lm`, on exactly the targets and bytes
    `dhad.evaluate.bpb.bits_per_byte` counts (every token after the first; special tokens left out)."""
    from dhad.evaluate.bpb import text_stream, token_byte_lengths
    ids = np.asarray(text_stream(tok, texts), dtype=np.int64)
    lp = lm.logprobs(ids)
    nbytes = token_byte_lengths(tok, lm.vocab_size)[ids[1:]]
    counted = nbytes > 0
    nll = -float(lp[counted].sum())
    total = float(nbytes.sum())
    return {"bpb": nll / math.log(2) / max(total, 1.0), "bytes": int(total), "tokens": int(counted.sum()),
            "nats_per_token": nll / max(int(counted.sum()), 1)}


def choose_order(counts: NgramCounts, tok, texts_by_lang: dict[str, list[str]]) -> tuple[int, dict]:
    """The order (1 .. counts.max_order) with the lowest bits per byte on `texts_by_lang` (all languages'
    bytes together), and {order: {lang: bpb, "all": bpb}}."""
    table = {}
    for k in range(1, counts.max_order + 1):
        lm = KneserNey(counts, k)
        res = {lang: ngram_bits_per_byte(lm, tok, t) for lang, t in texts_by_lang.items() if t}
        bits = sum(r["bpb"] * r["bytes"] for r in res.values())
        nb = sum(r["bytes"] for r in res.values())
        table[k] = {**{lang: r["bpb"] for lang, r in res.items()}, "all": bits / max(nb, 1)}
    best = min(table, key=lambda k: table[k]["all"])
    return best, table
