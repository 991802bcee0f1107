"""The Kneser–Ney baseline against probabilities worked out by hand on a toy corpus, and its bits per byte
against the same accounting as the transformer's."""
from __future__ import annotations

import math
from fractions import Fraction as F

import numpy as np
import pytest

from dhad.evaluate.ngram import FALLBACK_DISCOUNTS, KneserNey, NgramCounts, choose_order, discounts, \
    ngram_bits_per_byte

A, B, C, D = 0, 1, 2, 3
# The toy corpus: a b a b a b a b c c c d  (V = 4)
TOY = [A, B, A, B, A, B, A, B, C, C, C, D]

# Worked by hand (Chen & Goodman's interpolated modified Kneser-Ney, order 2):
#
# Bigram counts: ab 4, ba 3, cc 2, bc 1, cd 1.  Counts of counts: n1 = 2, n2 = 1, n3 = 1, n4 = 1, so
#   Y = n1 / (n1 + 2 n2) = 2/4 = 1/2
#   D1 = 1 - 2 Y n2/n1 = 1 - 2 (1/2)(1/2) = 1/2;  D2 = 2 - 3 Y n3/n2 = 2 - 3/2 = 1/2;  D3+ = 3 - 4 Y n4/n3 = 1.
#
# Unigram level: continuation counts = distinct left neighbours: a {b} 1, b {a} 1, c {b, c} 2, d {c} 1,
#   total 5. Counts of counts n1 = 3, n2 = 1, n3 = 0: Y = 3/5, D1 = 1 - 2(3/5)(1/3) = 3/5 is fine, but
#   D2 = 2 - 3 Y n3/n2 = 2 and D3+ divides by n3 = 0 -> undefined: KenLM's fallback D = 0.5, 1, 1.5.
#   gamma = (0.5 * 3 + 1 * 1 + 1.5 * 0) / 5 = 1/2, and the level below is uniform 1/4:
#   p1(a) = (1 - 0.5)/5 + (1/2)(1/4) = 1/10 + 1/8 = 9/40;   p1(b) = p1(d) = 9/40
#   p1(c) = (2 - 1)/5 + 1/8 = 13/40;                          sum = 27/40 + 13/40 = 1
P1 = {A: F(9, 40), B: F(9, 40), C: F(13, 40), D: F(9, 40)}
# Bigram level, history a: only b follows, 4 times: total 4, N3+ = 1 -> gamma = D3+ * 1 / 4 = 1/4
#   p(b|a) = (4 - 1)/4 + (1/4)(9/40) = 3/4 + 9/160 = 129/160;   p(a|a) = p(d|a) = 9/160;   p(c|a) = 13/160
# history b: a 3 times, c once: total 4, N1 = 1, N3+ = 1 -> gamma = (1/2 + 1)/4 = 3/8
#   p(a|b) = (3 - 1)/4 + (3/8)(9/40) = 1/2 + 27/320 = 187/320
#   p(c|b) = (1 - 1/2)/4 + (3/8)(13/40) = 1/8 + 39/320 = 79/320;   p(b|b) = p(d|b) = 27/320
# history c: c twice, d once: total 3, N1 = 1, N2 = 1 -> gamma = (1/2 + 1/2)/3 = 1/3
#   p(c|c) = (2 - 1/2)/3 + (1/3)(13/40) = 1/2 + 13/120 = 73/120
#   p(d|c) = (1 - 1/2)/3 + (1/3)(9/40) = 1/6 + 3/40 = 29/120;      p(a|c) = p(b|c) = 3/40
# history d: never followed by anything -> the unigram level: p(w|d) = p1(w)
P2 = {A: {A: F(9, 160), B: F(129, 160), C: F(13, 160), D: F(9, 160)},
      B: {A: F(187, 320), B: F(27, 320), C: F(79, 320), D: F(27, 320)},
      C: {A: F(3, 40), B: F(3, 40), C: F(73, 120), D: F(29, 120)},
      D: P1}


def test_hand_computed_modified_kneser_ney_bigram():
    counts = NgramCounts(TOY, max_order=2, vocab_size=4)
    assert discounts(counts.raw[2][1]) == (pytest.approx((0.5, 0.5, 1.0)), True)
    assert discounts(counts.cont[1][1]) == (FALLBACK_DISCOUNTS, False)
    lm = KneserNey(counts, 2)
    for h, row in P2.items():
        assert sum(row.values()) == 1  # the hand computation is a distribution
        for w, p in row.items():
            assert lm.prob([h], w) == pytest.approx(float(p), rel=1e-12), (h, w)
    # a whole stream is scored position by position with the same numbers: d a b c c d
    stream = [D, A, B, C, C, D]
    want = [P2[D][A], P2[A][B], P2[B][C], P2[C][C], P2[C][D]]
    assert np.exp(lm.logprobs(stream)) == pytest.approx([float(p) for p in want], rel=1e-12)


def test_hand_computed_unigram_model_uses_raw_counts():
    # Order 1: the raw unigram counts a 4, b 4, c 3, d 1 (total 12); counts of counts n1 = 1, n2 = 0 ->
    # fallback D = 0.5, 1, 1.5; gamma = (0.5 * 1 + 1.5 * 3) / 12 = 5/12; p(w) = (c - D)/12 + (5/12)(1/4)
    lm = KneserNey(NgramCounts(TOY, max_order=1, vocab_size=4), 1)
    want = {A: F(5, 2) / 12 + F(5, 48), B: F(5, 2) / 12 + F(5, 48), C: F(3, 2) / 12 + F(5, 48),
            D: F(1, 2) / 12 + F(5, 48)}
    assert sum(want.values()) == 1
    for w, p in want.items():
        assert lm.prob([], w) == pytest.approx(float(p), rel=1e-12)
        assert lm.prob([C, A], w) == pytest.approx(float(p), rel=1e-12)  # history ignored at order 1


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_history_gives_a_distribution(order):
    rng = np.random.default_rng(order)
    V = 7
    toks = np.concatenate([rng.integers(0, 3, 300), rng.integers(0, V, 200)])  # skewed, with rare tokens
    lm = KneserNey(NgramCounts(toks, max_order=4, vocab_size=V), order)
    for _ in range(20):
        h = rng.integers(0, V, order - 1).tolist()
        total = sum(lm.prob(h, w) for w in range(V))
        assert total == pytest.approx(1.0, abs=1e-12), h


class _ByteTok:
    """A tokenizer whose tokens are single characters (id = index in ALPHA), EOS = 0 with no bytes."""
    ALPHA = "\0ab c"
    eos_token_id = 0
    vocab_size = len(ALPHA)

    def encode_batch(self, texts):
        return [[self.ALPHA.index(ch) for ch in t] for t in texts]

    def token_bytes(self, i):
        return None if i == 0 else self.ALPHA[i].encode()


def test_bits_per_byte_counts_the_transformers_targets_and_bytes():
    tok = _ByteTok()
    train = np.asarray(sum(tok.encode_batch(["ab ab abc", "ba ab"]), []) * 5)
    counts = NgramCounts(train, max_order=3, vocab_size=tok.vocab_size)
    texts = ["ab c", "ba"]
    lm = KneserNey(counts, 2)
    res = ngram_bits_per_byte(lm, tok, texts)
    # stream: a b _ c EOS b a EOS; targets: every token after the first, EOS targets left out
    stream = [1, 2, 3, 4, 0, 2, 1, 0]
    lp = [math.log(lm.prob(stream[:i], stream[i])) for i in range(1, len(stream))]
    keep = [i for i in range(1, len(stream)) if stream[i] != 0]
    assert res["tokens"] == len(keep) == 5 and res["bytes"] == 5
    assert res["bpb"] == pytest.approx(-sum(lp[i - 1] for i in keep) / math.log(2) / 5, rel=1e-12)
    best, table = choose_order(counts, tok, {"x": ["ab ab abc"], "y": ["ba ab"]})
    assert best in (1, 2, 3) and table[best]["all"] == min(v["all"] for v in table.values())
    assert table[1]["all"] > table[2]["all"] > table[3]["all"]  # text seen in training: longer contexts win


def test_orders_too_large_for_64_bit_keys_are_refused():
    with pytest.raises(ValueError, match="64"):
        NgramCounts([1, 2, 3], max_order=5, vocab_size=16384)
    with pytest.raises(ValueError, match="token ids"):
        NgramCounts([1, 2, 9], max_order=2, vocab_size=4)
