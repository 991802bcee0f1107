"""DPO recipe type: losses by hand, one-forward layouts, reference modes, resume, bad pairs, recipes.

Core tests use random token pairs written as prefs shards (no shared data needed); the learning test on
the shared QA pairs is in test_dpo_learns.py and the TRL parity in test_dpo_trl.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dhad.checkpoint import load_model, save_model
from dhad.config import Config
from dhad.data.shards import ShardWriter
from dhad.model import Transformer
from dhad.train.dpo import (
    DPOConfig,
    DPOError,
    DPOObjective,
    Pair,
    collate,
    compute_logps,
    kl_k3,
    preference_loss,
    sequence_logps,
)
from dhad.train.loop import train
from dhad.train.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.one_thread  # tiny models: see conftest._one_thread

REPO = Path(__file__).resolve().parents[1]
V = 512


def _random_pairs(n, seed, max_prompt=14, max_answer=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    ids = lambda k: torch.randint(1, V, (k,), generator=g).tolist()
    return [Pair(i, ids(r(2, max_prompt)), ids(r(1, max_answer)), ids(r(1, max_answer))) for i in range(n)]


def _write_prefs(out: Path, split: str, pairs, extra_rows=()):
    w = ShardWriter(out, split, "prefs", vocab_size=V, eos_token_id=0, pad_token_id=0)
    for p in pairs:
        w.add_pair(p.prompt, p.chosen, p.rejected, source="synthetic")
    for row in extra_rows:
        w.add_pair(*row, source="bad")
    w.close()


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 'SFT' model directory and prefs shards of random pairs (train + validation)."""
    root = tmp_path_factory.mktemp("dpo")
    model = Transformer(Config.from_name("tiny-llama", block_size=64)).init_weights(seed=0)
    save_model(model, root / "sft")
    _write_prefs(root / "prefs", "train", _random_pairs(48, 1))
    _write_prefs(root / "prefs", "validation", _random_pairs(16, 2))
    return root


def _recipe(world, run, steps=4, **objective):
    return parse_recipe(dict(
        type="dpo", name=run, seed=7, model={"init_from": str(world / "sft")},
        data={"sources": {"syn": str(world / "prefs")}, "val_split": "validation"},
        objective={"beta": 0.1, **objective},
        optimizer={"lr": 3e-3, "weight_decay": 0.0}, schedule={"total_steps": steps, "warmup_steps": 1},
        batch={"micro_batch_size": 4, "grad_accum": 2, "seq_len": 32}, precision="fp32",
        eval_every=0, eval_batches=2, checkpoint_every=0, log_every=1, peak_flops=1e11))


# ---------------------------------------------------------------------------------------------
# Losses, by hand

def test_losses_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -5.0])
    beta = 0.1
    out = preference_loss(pc, pr, rc, rr, beta=beta)
    # DPO eq. 7: -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    d = [(-3.0 + 3.5) - (-4.0 + 3.5), (-5.0 + 5.0) - (-4.5 + 5.0)]  # [1.0, -0.5]
    want = [math.log1p(math.exp(-beta * x)) for x in d]
    torch.testing.assert_close(out.losses, torch.tensor(want), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.05]))
    # conservative DPO: (1 - eps) * -logsig(z) + eps * -logsig(-z)
    eps = 0.2
    ls = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    want_ls = [(1 - eps) * math.log1p(math.exp(-beta * x)) + eps * math.log1p(math.exp(beta * x)) for x in d]
    torch.testing.assert_close(ls.losses, torch.tensor(want_ls), rtol=0, atol=1e-7)
    # IPO eq. 17 with per-token log-ratios: (d/n - 1/(2 beta))^2
    nc, nr = torch.tensor([2, 4]), torch.tensor([1, 5])
    ipo = preference_loss(pc, pr, rc, rr, beta=beta, loss="ipo", n_chosen=nc, n_rejected=nr)
    h = [(0.5 / 2 - (-0.5) / 1), (0.0 / 4 - 0.5 / 5)]
    torch.testing.assert_close(ipo.losses, torch.tensor([(x - 5.0) ** 2 for x in h]), rtol=1e-6, atol=1e-6)
    # k3 KL estimate e^r - 1 - r: zero at r = 0, never negative
    k = kl_k3(torch.tensor([0.0, 1.0, -1.0]))
    torch.testing.assert_close(k, torch.tensor([0.0, math.e - 2, math.exp(-1)], dtype=torch.float64))


def test_config_errors_name_the_field():
    with pytest.raises(DPOError, match="dpo.loss"):
        DPOConfig(loss="hinge")
    with pytest.raises(DPOError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(DPOError, match="unknown dpo settings"):
        DPOConfig.from_dict({"betta": 0.1})


# ---------------------------------------------------------------------------------------------
# One forward for both answers: shared-prompt (token tree) layout == concatenated layout == per pair

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-jais"])
def test_shared_prompt_equals_concat_and_single_pairs(preset):
    torch.manual_seed(0)
    model = Transformer(Config.from_name(preset)).init_weights(seed=3)
    pairs = _random_pairs(5, 11)
    results = []
    for share in (True, False):
        model.zero_grad()
        lp = sequence_logps(model, collate(pairs, share))
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # each answer alone, no padding, plain log-softmax: the independent value
    with torch.no_grad():
        for k, p in enumerate(pairs):
            for j, ans in enumerate((p.chosen, p.rejected)):
                x = torch.tensor([p.prompt + ans])
                logp = F.log_softmax(model(x)[0].float(), -1)
                want = sum(float(logp[len(p.prompt) - 1 + t, a]) for t, a in enumerate(ans))
                assert abs(float(results[0][0][k + j * len(pairs)]) - want) < 1e-4


# ---------------------------------------------------------------------------------------------
# Reference: precomputed == on the fly; the reference never moves

def test_precomputed_and_frozen_reference_agree(world):
    res = {}
    before = _digest(world / "sft")
    for mode in ("precomputed", "frozen"):
        r = train(_recipe(world, f"ref-{mode}", reference=mode), run_dir=world / f"run-{mode}", progress=False)
        recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        res[mode] = [x for x in recs if x.get("event") == "step"], r
    a, b = res["precomputed"][0], res["frozen"][0]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "kl"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x[k], y[k])
    assert a[-1]["rewards/margin"] != 0.0  # the policy moved away from the reference
    # the SFT parent on disk is untouched, and the cache was written beside the run
    assert _digest(world / "sft") == before
    assert (world / "run-precomputed" / "ref_logps" / "train-syn.safetensors").is_file()
    rep = json.loads((world / "run-precomputed" / "dpo_report.json").read_text())
    assert rep["reference"]["mode"] == "precomputed"


def test_reference_model_and_table_untouched_by_training(world):
    """Drive the objective directly for a few optimizer steps: the frozen copy keeps the SFT weights
    bit for bit and precomputed log-probs equal a fresh pass of the SFT model."""
    sft = load_model(world / "sft")
    for mode in ("frozen", "precomputed"):
        obj = DPOObjective(beta=0.1, reference=mode)
        stream = obj.open_source("syn", world / "prefs", "train", 0, True)
        policy = load_model(world / "sft").train()
        recipe = _recipe(world, "direct")
        obj.setup(policy, recipe, "cpu", run_dir=None)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        for _ in range(3):
            batch = obj.collate([stream.next_item(32) for _ in range(6)], "cpu")
            s, n = obj.loss(policy, batch)
            (s / n).backward()
            opt.step()
            opt.zero_grad()
        moved = max(float((p - q).abs().max()) for p, q in zip(policy.parameters(), sft.parameters()))
        assert moved > 1e-3
        if mode == "frozen":
            for (name, p), q in zip(obj.ref_model.named_parameters(), sft.parameters()):
                assert torch.equal(p, q), name
            assert not any(p.requires_grad for p in obj.ref_model.parameters())
        else:
            view = obj.views[("train", "syn")]
            fresh = compute_logps(sft, list(view), batch_size=5)
            torch.testing.assert_close(obj.tables[("train", "syn")][torch.tensor(view.keep)], fresh,
                                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Throughput counts real tokens; the reference pass is silent when progress is off

@pytest.mark.parametrize("share", [True, False])
def test_tokens_processed_counts_real_tokens(world, share):
    obj = DPOObjective(beta=0.1, reference="frozen", share_prompt=share)
    obj.open_source("syn", world / "prefs", "train", 0, False)
    model = load_model(world / "sft")
    obj.setup(model, _recipe(world, "count"), "cpu", run_dir=None)
    view = obj.views[("train", "syn")]
    items = [view[j] for j in range(5)]
    obj.loss(model, obj.collate(items, "cpu"))
    # by hand, no padding: the prompt once (shared-prompt layout) or once per answer row (concatenated)
    want = sum((1 if share else 2) * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in items)
    assert obj.metrics()["tokens_processed"] == want
    with torch.no_grad():  # an evaluation batch padded in only to keep ranks in step counts nowhere
        b = obj.collate(items, "cpu")
        b["lockstep_only"] = True
        obj.loss(model, b)
    assert obj.eval_metrics() == {}


def test_no_reference_progress_bar_without_progress(world, capfd):
    train(_recipe(world, "quiet", steps=1), run_dir=world / "run-quiet", progress=False)
    assert "reference log-probs" not in capfd.readouterr().err
    compute_logps(load_model(world / "sft"), _random_pairs(4, 3), progress=True)  # the bar the run kept quiet
    assert "reference log-probs" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# Resume

def test_resume_reproduces_uninterrupted_run(world):
    full = train(_recipe(world, "full", steps=6), run_dir=world / "run-full", progress=False)
    part = train(_recipe(world, "part", steps=6), run_dir=world / "run-part", progress=False, stop_at=3)
    assert part.interrupted and part.step == 3
    rest = train(_recipe(world, "part", steps=6), run_dir=world / "run-part", progress=False, resume=True)
    got = dict(part.losses + rest.losses)
    want = dict(full.losses)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for k, v in want.items():
        assert abs(got[k] - v) < 1e-6, (k, got[k], v)
    rep = json.loads((world / "run-part" / "dpo_report.json").read_text())
    assert rep["reference"]["tables"]["train/syn"]["reused"] is True  # the cache beside the run was reused
    a, b = load_model(full.model_dir), load_model(rest.model_dir)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Bad pairs: counted, skipped, reported; the run goes on

def test_bad_pairs_are_counted_and_skipped(tmp_path, world):
    good = _random_pairs(24, 5)
    bad = [([3, 4, 5], [7, 8], [7, 8]),          # identical answers
           ([3, 4], [], [9]),                    # empty chosen
           ([], [5], [6]),                       # no prompt
           (list(range(1, 40)), [5], [6, 7])]    # longer than seq_len 32
    _write_prefs(tmp_path / "prefs", "train", good, extra_rows=bad)
    _write_prefs(tmp_path / "prefs", "validation", _random_pairs(8, 6))
    r = parse_recipe(dict(
        type="dpo", model={"init_from": str(world / "sft")},
        data={"sources": {"mixed": str(tmp_path / "prefs")}, "val_split": "validation"},
        optimizer={"lr": 1e-3}, schedule={"total_steps": 2}, batch={"micro_batch_size": 4, "seq_len": 32},
        precision="fp32", eval_batches=1, peak_flops=1e11))
    res = train(r, run_dir=tmp_path / "run", progress=False)
    assert res.step == 2 and (res.model_dir / "model.safetensors").is_file()
    rep = json.loads((tmp_path / "run" / "dpo_report.json").read_text())["pairs"]["train/mixed"]
    assert rep["total"] == 28 and rep["kept"] == 24
    assert rep["skipped"] == {"identical": 1, "empty_answer": 1, "empty_prompt": 1, "too_long": 1}
    assert "pair 27" in rep["skipped_examples"]["too_long"][0]


def test_malformed_rows_end_to_end(tmp_path, world):
    """Raw rows with missing fields, non-alternating roles and invalid UTF-8 through `dhad data prefs`
    (dhad.data.prefs) into a DPO run: the reader counts and skips them, the run trains on the rest."""
    from dhad.data.prefs import PrefsConfig, prepare_prefs
    from dhad.tokenizer import train_bpe

    rows = []
    for i in range(30):
        rows.append(json.dumps({"prompt": [{"role": "user", "content": f"question {i}?"}],
                                "chosen": f"answer {i}", "rejected": f"wrong {i + 1}"}).encode())
    rows.append(json.dumps({"prompt": "no answers here"}).encode())                       # missing fields
    rows.append(json.dumps({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                            "chosen": "x", "rejected": "y"}).encode())                     # non-alternating
    rows.append(b'{"prompt": "bad \xff\xfe bytes", "chosen": "a", "rejected": "b"}')        # invalid UTF-8
    src = tmp_path / "raw.jsonl"
    src.write_bytes(b"\n".join(rows) + b"\n")
    tok = train_bpe([r.decode("utf-8", "replace") for r in rows] * 3, 300, chat_template="jais")
    tok.save(tmp_path / "tok")
    rep = prepare_prefs(PrefsConfig(inputs=[str(src)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "prefs"),
                                    chat_format="jais", max_len=None, val_fraction=0.2, seed=0))
    dropped = {**rep["inputs"]["skipped"], **rep["dropped"]}
    assert sum(dropped.values()) == 3, dropped
    assert rep["splits"]["train"]["pairs"] + rep["splits"]["validation"]["pairs"] == 30
    model = Transformer(Config.from_name("tiny-jais", vocab_size=300)).init_weights(seed=0)
    save_model(model, tmp_path / "sft", tokenizer=tok)
    r = parse_recipe(dict(
        type="dpo", model={"init_from": str(tmp_path / "sft")},
        data={"sources": {"raw": str(tmp_path / "prefs")}, "val_split": "validation"},
        optimizer={"lr": 1e-3}, schedule={"total_steps": 2}, batch={"micro_batch_size": 2, "seq_len": 512},
        precision="fp32", eval_batches=1, peak_flops=1e11))
    res = train(r, run_dir=tmp_path / "run", progress=False)
    assert res.step == 2
    report = json.loads((tmp_path / "run" / "dpo_report.json").read_text())
    assert "dhad data prefs dropped 3 rows" in report["pairs"]["train/raw"]["prepared"]


# ---------------------------------------------------------------------------------------------
# Shipped recipes

@pytest.mark.parametrize("name", ["allam-style-dpo", "tiny-dpo", "tiny-dpo-ipo"])
def test_shipped_dpo_recipes_load(name):
    path = REPO / "recipes" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    r = load_recipe(path)
    assert r.type == "dpo"
    cfg = DPOConfig.from_dict(r.objective)
    assert cfg.beta == 0.1
    assert "not from" in text.lower()  # the card gives no DPO hyperparameters: the file says so
