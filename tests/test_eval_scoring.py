"""The scoring engine against the plain definition: one unpadded forward per request.

The engine lays a question's inputs out as one token tree (shared trunk, one branch per distinct
remainder) under a tree attention mask, packs several trees per row, computes a shared few-shot
block once per batch as keys/values, and takes logits only where scored; none of that may change
a number. Checked on both position schemes
(RoPE for Llama / ALLaM, ALiBi for Jais, where left padding must not shift distances), with
left truncation, single-token choices, different contexts (Winogrande) and an empty context.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dhad.config import Config
from dhad.evaluate import scoring
from dhad.evaluate.scoring import Scorer, encode_pair, score_example
from dhad.model import Transformer


class ByteTok:
    """A byte tokenizer with a BOS, enough to drive the engine (ids 3..258 are bytes)."""
    bos_token_id, eos_token_id = 1, 2

    def encode(self, s, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + b for b in s.encode("utf-8")]


def _model(name, seed=0, **overrides):
    cfg = dataclasses.replace(Config.from_name(name), **overrides)
    torch.manual_seed(seed)
    m = Transformer(cfg).init_weights(seed=seed).eval()
    with torch.no_grad():  # wider weights than the default init: choices differ clearly
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m


def _reference(model, ctx, cont, max_length):
    seq = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).float(), -1)[0]
    lp = logp[-len(cont):]
    t = torch.tensor(cont)
    return lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all())


GROUPS = [
    [("Question: what is 2+2?\nAnswer:", " four"), ("Question: what is 2+2?\nAnswer:", " five apples"),
     ("Question: what is 2+2?\nAnswer:", " 4")],
    [("السؤال: الجزائر بلد عربي\nالإجابة:", " صح"), ("السؤال: الجزائر بلد عربي\nالإجابة:", " خطأ")],
    [("A. x\nB. y\nAnswer:", " A"), ("A. x\nB. y\nAnswer:", " B")],                  # single-token choices
    [("Sarah was better than Maria so Sarah", " got the cases."),                      # Winogrande: contexts differ
     ("Sarah was better than Maria so Maria", " got the cases.")],
    [("trailing space ", "word"), ("trailing space ", "other")],                       # space moves to the continuation
    [("", "an empty context scores from BOS")],
    [("x" * 300, " long context left-truncated"), ("x" * 300, " other")],
    [("Q: 1?\nA:", " 1"), ("Q: 1?\nA:", " 2")],                                     # short trees: packed
    [("Q: 2?\nA:", " 2"), ("Q: 2?\nA:", " 3")],                                     # several to a row
    [("Q: 3?\nA:", " 3"), ("Q: 3?\nA:", " 4")],
]
SHOTS = "The following are questions.\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\n"  # a first_n few-shot block
GROUPS += [  # questions sharing the block: it is run once per batch and the cache copied per input
    [(SHOTS + "Q: 3+3?\nA:", " 6"), (SHOTS + "Q: 3+3?\nA:", " seven")],
    [(SHOTS + "Q: 5+5?\nA:", " 10"), (SHOTS + "Q: 5+5?\nA:", " 11")],
    [(SHOTS + "Q: which?\nA:", " A"), (SHOTS + "Q: which?\nA:", " B")],
    [(SHOTS + "Sarah so Sarah", " won."), (SHOTS + "Sarah so Maria", " won.")],
]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-jais"])
def test_shared_prefix_engine_equals_one_forward_per_request(name, monkeypatch):
    model, tok = _model(name), ByteTok()
    L = 200  # shorter than the long group: exercises the harness's left truncation
    scorer = Scorer(model, tok, max_length=L, batch_tokens=1200, max_rows=5)
    blocks = []  # token lengths of the shared-block passes
    real = scoring._block_cache
    monkeypatch.setattr(scoring, "_block_cache", lambda m, block: blocks.append(len(block)) or real(m, block))
    packed = []  # trees per row of every batch
    real_run = Scorer._run
    monkeypatch.setattr(Scorer, "_run", lambda self, rows, kv: packed.extend(len(r) for r in rows) or real_run(self, rows, kv))
    got = scorer.loglikelihood(GROUPS)
    assert blocks and min(blocks) >= len(SHOTS)  # the few-shot block ran once for several questions
    assert max(packed) > 1  # several questions' trees shared a row
    enc = lambda s: tok.encode(s)
    for group, res in zip(GROUPS, got):
        for (c, x), (ll, greedy) in zip(group, res):
            if c == "":
                ci, xi = [tok.bos_token_id], tok.encode(x, add_special_tokens=False)
            else:
                ci, xi = encode_pair(enc, c, x)
            ref, ref_greedy = _reference(model, ci, xi, L)
            assert ll == pytest.approx(ref, abs=1e-4, rel=1e-5), (c, x)
            assert greedy == ref_greedy


@pytest.mark.parametrize("name,overrides", [
    ("tiny-jais", {"alibi_scaling": {"type": "linear", "train_seq_len": 24}}),  # slopes / (key_len / 24) past 24
    ("tiny-jais", {"alibi_scaling": {"type": "linear", "factor": 2.0}}),
    ("tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
])
def test_scaled_positions_equal_one_forward_per_request(name, overrides):
    # with train_seq_len the ALiBi factor depends on each sequence's own length, so a trunk shared by
    # inputs of different lengths would see the wrong one: such groups are scored unshared
    model, tok = _model(name, **overrides), ByteTok()
    got = Scorer(model, tok, max_length=200, batch_tokens=1200, max_rows=5).loglikelihood(GROUPS)
    for group, res in zip(GROUPS, got):
        for (c, x), (ll, greedy) in zip(group, res):
            ci, xi = ([tok.bos_token_id], tok.encode(x, add_special_tokens=False)) if c == "" else encode_pair(tok.encode, c, x)
            ref, ref_greedy = _reference(model, ci, xi, 200)
            assert ll == pytest.approx(ref, abs=1e-4, rel=1e-5), (c, x)
            assert greedy == ref_greedy


def test_batching_does_not_change_results_and_runs_are_deterministic():
    model, tok = _model("tiny-llama", seed=1), ByteTok()
    a = Scorer(model, tok, max_rows=1, batch_tokens=100000).loglikelihood(GROUPS)
    b = Scorer(model, tok, max_rows=64, batch_tokens=100000).loglikelihood(GROUPS)
    c = Scorer(model, tok, max_rows=64, batch_tokens=100000).loglikelihood(GROUPS)
    assert b == c
    for ga, gb in zip(a, b):
        assert [x[0] for x in ga] == pytest.approx([x[0] for x in gb], abs=1e-4)


def test_prefix_token_is_bos_else_eos():
    class NoBos(ByteTok):
        bos_token_id = None
    assert Scorer(_model("tiny-llama"), NoBos()).prefix_token_id == 2
    assert Scorer(_model("tiny-llama"), ByteTok()).prefix_token_id == 1


def test_metrics_by_hand():
    # acc: argmax of log-likelihoods; acc_norm: argmax of ll / len(choice) in characters
    m = score_example([-4.0, -3.0, -6.0], ["abcd", "a", "abcdefghi"], gold=2)
    assert (m["pred"], m["acc"]) == (1, 0.0)
    assert (m["pred_norm"], m["acc_norm"]) == (2, 1.0)  # -1.0, -3.0, -0.67
    # -4/4 = -9/9 = -1.0: a tie goes to the first index, like numpy.argmax
    m = score_example([-4.0, -3.0, -9.0], ["abcd", "a", "abcdefghi"], gold=0)
    assert (m["pred_norm"], m["acc_norm"]) == (0, 1.0)
    # Arabic choices count characters, not bytes: "خطأ" is 3 characters (6 bytes)
    m = score_example([-2.0, -2.9], ["صح", "خطأ"], gold=1)
    assert (m["pred"], m["pred_norm"]) == (0, 1)


def test_mc2_is_the_normalised_mass_on_true_answers():
    lls = [math.log(0.2), math.log(0.1), math.log(0.3), math.log(0.4)]
    m = score_example(lls, ["a", "b", "c", "d"], gold=0, mc2_labels=[1, 1, 0, 0])
    assert m["acc"] == pytest.approx(0.3)
    m = score_example([-1000.0, -1001.0], ["a", "b"], gold=0, mc2_labels=[1, 0])  # stable far from 0
    assert m["acc"] == pytest.approx(1 / (1 + math.exp(-1)))
