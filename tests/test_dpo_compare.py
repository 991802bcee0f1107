"""Aligned vs SFT parent: the MT-bench pairwise path (with a scripted judge) and held-out preference accuracy."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from dhad.checkpoint import save_model
from dhad.config import Config
from dhad.data.shards import ShardWriter
from dhad.train.compare import compare_models, preference_accuracy
from dhad.evaluate.mtbench import load_answers
from dhad.model import Transformer

pytestmark = pytest.mark.one_thread  # tiny models: see conftest._one_thread

ANS = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.DOTALL)


class LongerAnswerJudge:
    """An OpenAI-style judge stand-in: prefers the longer answer (characters), [[C]] on equal lengths."""
    model = "longer-answer-judge"

    def __init__(self):
        self.calls = 0

    def chat(self, messages, temperature=0.0, max_tokens=1024):
        self.calls += 1
        found = dict(ANS.findall(messages[-1]["content"]))
        a, b = len(found.get("A", "")), len(found.get("B", ""))
        return "[[A]]" if a > b else "[[B]]" if b > a else "[[C]]"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dhad.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("cmp")
    tok = train_bpe(["Hello there, how are you? مرحبا كيف الحال؟ 1234 answers questions"] * 20, 300,
                    chat_template="chatml")
    cfg = Config.from_name("tiny-jais", vocab_size=tok.vocab_size, block_size=4096)  # ALiBi: any length
    parent = Transformer(cfg).init_weights(seed=0)
    save_model(parent, root / "parent", tokenizer=tok)
    save_model(parent, root / "same", tokenizer=tok)
    aligned = Transformer(cfg).init_weights(seed=0)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(aligned, root / "aligned", tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(root / "prefs", "validation", "prefs", vocab_size=tok.vocab_size, eos_token_id=0)
    for _ in range(12):
        w.add_pair(torch.randint(3, 300, (6,), generator=g).tolist(), torch.randint(3, 300, (3,), generator=g).tolist(),
                   torch.randint(3, 300, (2,), generator=g).tolist())
    w.close()
    return root, aligned, parent


def _answer_logp(model, prompt, ans):
    x = torch.tensor([prompt + ans])
    lp = F.log_softmax(model(x)[0].float(), -1)
    return sum(float(lp[len(prompt) - 1 + t, a]) for t, a in enumerate(ans))


def test_identical_models_tie_everywhere(models, shared_data, tmp_path):
    root, _, _ = models
    judge = LongerAnswerJudge()
    r = compare_models(root / "same", root / "parent", tmp_path, data_dir=shared_data, judge=judge, limit=1,
                       max_new_tokens=6, prefs_dir=root / "prefs", progress=False)
    for lang in ("en", "ar"):
        d = r["mt_bench_pairwise"]["languages"][lang]
        assert (d["win"], d["loss"], d["tie"]) == (0, 0, 2)  # 1 question x 2 turns, the same answers
    assert judge.calls == 2 * 1 * 2 * 2  # languages x questions x turns x (both positions)
    h = r["heldout_preferences"]
    assert h["pairs"] == 12 and h["reward_accuracy"] == 0.5 and h["reward_margin"] == 0.0
    assert h["likelihood_accuracy_aligned"] == h["likelihood_accuracy_parent"]


def test_aligned_vs_parent_counts_and_accuracy(models, shared_data, tmp_path):
    root, aligned, parent = models
    r = compare_models(root / "aligned", root / "parent", tmp_path, data_dir=shared_data, judge=LongerAnswerJudge(),
                       langs=["en"], limit=2, max_new_tokens=8, prefs_dir=root / "prefs", progress=False)
    # the judge's verdicts, recomputed from the answer files the comparison wrote
    a = load_answers(tmp_path / "answers-en-aligned.jsonl")
    p = load_answers(tmp_path / "answers-en-parent.jsonl")
    win = sum(len(a[q][t]) > len(p[q][t]) for q in a for t in (0, 1))
    loss = sum(len(a[q][t]) < len(p[q][t]) for q in a for t in (0, 1))
    d = r["mt_bench_pairwise"]["languages"]["en"]
    assert (d["win"], d["loss"], d["tie"]) == (win, loss, 4 - win - loss)
    assert json.loads((tmp_path / "comparison.json").read_text())["mt_bench_pairwise"]["languages"]["en"] == d
    # held-out accuracy from one unpadded forward per answer
    from dhad.data.shards import PrefsSet
    ps = PrefsSet.open(root / "prefs", "validation")
    correct = 0.0
    with torch.no_grad():
        for x in ps:
            pr, c, rj = (x[k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            m = (_answer_logp(aligned, pr, c) - _answer_logp(parent, pr, c)) \
                - (_answer_logp(aligned, pr, rj) - _answer_logp(parent, pr, rj))
            correct += 1.0 if m > 1e-3 else 0.5 if abs(m) <= 1e-3 else 0.0
    h = preference_accuracy(aligned.eval(), parent.eval(), root / "prefs")
    assert h["reward_accuracy"] == pytest.approx(correct / len(ps)) == r["heldout_preferences"]["reward_accuracy"]
    assert h["reward_accuracy"] != 0.5
